"""Entry points: ``edgeproxy serve | sink | config | check-relay | passwd``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence

from edgeproxy.config import ConfigError, Settings, markdown_table


def _load(environ: Mapping[str, str]) -> Settings | None:
    try:
        return Settings.from_env(environ)
    except ConfigError as error:
        for line in error.problems:
            print(f"edgeproxy: {line}", file=sys.stderr)
        return None


def cmd_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    settings = _load(environ)
    if settings is None:
        return 1
    from edgeproxy import fastpath

    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name.ljust(width)}  {value}")
    print(f"{'# fast path'.ljust(width)}  {fastpath.IMPLEMENTATION}")
    return 0


def cmd_check_relay(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Show what the policy answers one RCPT from one client, as an operator would test it; with
    ``--server``, probe a live server for open relay instead (edgeproxy.relaycheck)."""
    from edgeproxy import relaycheck

    if relaycheck.remote_requested(args):
        return relaycheck.command(args, args.usage_error)
    if args.client is None or args.recipient is None:
        args.usage_error("give CLIENT and RECIPIENT, or --server HOST:PORT")
    settings = _load(environ)
    if settings is None:
        return 1
    from edgeproxy import fastpath_common as fc
    from edgeproxy.fastpath import ParseError
    from edgeproxy.policy import Policy

    policy = Policy(settings)
    refusal = policy.check_connect(args.client)
    if refusal:
        print(f"connect refused ({refusal.rule}): {refusal.reply}")
        return 2
    from edgeproxy.listener import ListenerKind

    listener = ListenerKind.RELAY if args.relay_listener else ListenerKind.SMTP
    grant = policy.relay_grant(args.client, listener, args.authenticated)
    try:
        verdict = policy.decide_rcpt(f"TO:<{args.recipient}>", grant)
    except ParseError as error:
        print(f"syntax error ({error.reason})")
        return 2
    refusal = policy.refusal_for(verdict)
    rule = fc.RULE_NAMES[verdict.rule]
    if refusal:
        print(f"refused ({rule}): {refusal.reply}")
        return 2
    print(f"accepted ({rule}): forwarded as <{verdict.address}>")
    return 0


def cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = _load(environ)
    if settings is None:
        return 1
    from edgeproxy.lifecycle import run

    return run(settings, environ)


def cmd_sink(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import asyncio
    import tempfile

    from edgeproxy.lifecycle import listen_socket
    from edgeproxy.parsers import parse_host_port
    from edgeproxy.sink import serve_sink

    try:
        host, port = parse_host_port(args.listen)
    except ValueError as error:
        print(f"edgeproxy sink: --listen {args.listen!r}: {error}", file=sys.stderr)
        return 1
    directory = args.dir or tempfile.mkdtemp(prefix="edgeproxy-sink-")
    sock = listen_socket(host, port, reuse_port=False)
    bound = sock.getsockname()
    print(f"edgeproxy sink: listening on {bound[0]}:{bound[1]}, writing messages to {directory}",
          file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_sink(sock, directory))
    return 0


def cmd_passwd(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the users-file line for USER, the password read from stdin (no echo on a terminal)."""
    import getpass

    from edgeproxy.auth import hash_password

    if not args.user or ":" in args.user or any(ord(char) < 33 for char in args.user):
        print(f"edgeproxy passwd: {args.user!r}: a user name has no colon, space or control character",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
    else:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not password:
        print("edgeproxy passwd: an empty password is not allowed", file=sys.stderr)
        return 2
    print(f"{args.user}:{hash_password(password)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy, configured by EDGEPROXY_* variables")
    serve.set_defaults(handler=cmd_serve)
    sink = commands.add_parser("sink", help="run a local SMTP sink that writes each message to a file")
    sink.add_argument("--listen", default="127.0.0.1:2526", help="host:port (default %(default)s)")
    sink.add_argument("--dir", default="", help="directory for messages (default: a new temporary one)")
    sink.set_defaults(handler=cmd_sink)
    config = commands.add_parser("config", help="print the effective configuration; exit 1 on errors")
    config.add_argument("--markdown", action="store_true", help="print the variable table for README.md")
    config.set_defaults(handler=cmd_config)
    check = commands.add_parser("check-relay", help="decide one recipient for one client, and exit; or, with "
                                "--server, probe a live server for open relay")
    check.add_argument("client", nargs="?", help="client IP address, e.g. 192.0.2.7")
    check.add_argument("recipient", nargs="?", help="recipient address, e.g. user@example.com")
    check.add_argument("--authenticated", action="store_true")
    check.add_argument("--relay-listener", action="store_true", help="as if on a relay listener")
    from edgeproxy.relaycheck import DEFAULT_FOREIGN_DOMAIN, FALLBACK_LOCAL_DOMAIN

    remote = check.add_argument_group(
        "remote test (--server)",
        "Probe a live SMTP server for open relay instead of asking the local policy: a foreign recipient from "
        "each sender kind and every encapsulation form (percent hack, bang path, source route, quoted local "
        "parts, IP literals, ...). Each probe is MAIL, RCPT, RSET; DATA is never sent. Exit status 1 if any "
        "RCPT got 2xx, 0 if none, 2 on a usage or connection error.")
    remote.add_argument("--server", metavar="HOST:PORT", help="the server to probe, e.g. mx.example.com:25")
    remote.add_argument("--source", metavar="ADDR", help="bind the client socket to this source address")
    remote.add_argument("--starttls", action="store_true",
                        help="run the probes inside STARTTLS (the certificate is NOT verified: this is a "
                             "diagnosis tool); exit 2 if the server does not offer it")
    remote.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    remote.add_argument("--helo", metavar="NAME", help="EHLO/HELO name (default: this host's name)")
    remote.add_argument("--local-domain", metavar="DOMAIN",
                        help="a domain the server accepts mail for, used in the encapsulation forms (default: "
                             f"the domain of the greeting's host name, else {FALLBACK_LOCAL_DOMAIN})")
    remote.add_argument("--foreign-domain", metavar="DOMAIN",
                        help=f"the relay destination probed (default {DEFAULT_FOREIGN_DOMAIN}, which never "
                             "receives mail)")
    remote.add_argument("--timeout", metavar="SECONDS", type=float, help="per operation (default 10)")
    check.set_defaults(handler=cmd_check_relay, usage_error=check.error)
    passwd = commands.add_parser("passwd", help="print a users-file line (argon2id) for USER; password on stdin")
    passwd.add_argument("user")
    passwd.set_defaults(handler=cmd_passwd)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args, os.environ if environ is None else environ)
