"""``edgeproxy check-relay --server HOST:PORT``: probe a live SMTP server for open relay.

The seed articles test a server by hand: ``telnet server 25``, ``HELO``, ``MAIL FROM`` a sender
(even one of the server's own domains), ``RCPT TO`` a foreign address, and expect ``550 Relaying
prohibited``. This module runs that test, and every variant an abuser would try next: each sender
kind (null, local, foreign) and every encapsulation form of design.md §2 rule 2 (percent hack,
bang path, source route, several ``@``, quoted local parts, IP literals, Exchange ``IMCEA``), plus
case, trailing-dot and quoting tricks on the foreign domain. Every probe is ``MAIL``, ``RCPT``,
``RSET``: ``DATA`` is never sent, so no message can be delivered whatever the server answers.

A probe is *open* when its RCPT got a 2xx reply: the server took responsibility for a recipient
whose mail may leave for a foreign domain. For an encapsulated form at the local domain a 2xx may
also mean a catch-all mailbox; it is still reported, since the server (or the one behind it) may
decode the form into a foreign destination (the Exchange 5.5 IMS hole of August 1999).

The pieces: :func:`build_probes` (pure), :class:`Prober` (the network), :func:`format_table` and
:func:`to_json` (the output), :func:`command` (the CLI glue).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import smtplib
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NoReturn

USER = "relaytest"
FALLBACK_LOCAL_DOMAIN = "example.com"
# RFC 2606 reserved and published with a null MX (RFC 7505): nothing can ever be delivered there,
# yet it is a syntactically ordinary domain, which servers treat as any other foreign one.
DEFAULT_FOREIGN_DOMAIN = "example.net"
FOREIGN_LITERAL = "192.0.2.1"  # RFC 5737 TEST-NET-1
FOREIGN_LITERAL6 = "2001:db8::1"  # RFC 3849 documentation prefix
# Servers count refused commands per session and answer slowly past a threshold (Postfix's
# smtpd_soft_error_limit, 10) or hang up (its hard limit, 20; edgeproxy's MAX_ERRORS, 20): a few
# probes per connection stay clear of both without a connection per probe.
PROBES_PER_CONNECTION = 8

OPEN, CLOSED, ERROR = "open", "closed", "error"


@dataclass(frozen=True)
class Probe:
    form: str  # a short name for the trick, e.g. "percent hack"
    sender_kind: str  # null, local or foreign
    sender: str  # inside MAIL FROM:<...>, empty for the null sender
    argument: str  # exactly what follows "RCPT ", e.g. "TO:<relaytest@example.net>"

    @property
    def recipient(self) -> str:
        return self.argument.removeprefix("TO:").strip()


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    verdict: str  # open, closed or error
    stage: str  # the command whose reply decided: MAIL or RCPT ("" when none was answered)
    code: int | None
    text: str


@dataclass
class Report:
    server: str
    greeting: str
    local_domain: str
    foreign_domain: str
    server_literal: str
    tls: str | None  # the TLS version the probes ran inside, None for plaintext
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(outcome.verdict == verdict for outcome in self.outcomes)

    @property
    def exit_status(self) -> int:
        # An accepted recipient is a finding even when other probes could not be completed.
        return 1 if self.count(OPEN) else 2 if self.count(ERROR) else 0


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    source: str | None = None
    starttls: bool = False
    helo: str | None = None
    local_domain: str | None = None
    foreign_domain: str = DEFAULT_FOREIGN_DOMAIN
    timeout: float = 10.0


class ProbeError(Exception):
    """The server cannot be probed at all: unreachable, no greeting, no EHLO/HELO, no TLS."""


# -- the probes -----------------------------------------------------------------------------------


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"[IPv6:{address.compressed}]" if address.version == 6 else f"[{address}]"


_HOST_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]")


def domain_from_greeting(greeting: str) -> str | None:
    """The domain the greeting's host name sits in: ``mail.example.com`` → ``example.com``; a
    two-label name is its own domain. None when the greeting names no host (a bare word, an IP)."""
    words = greeting.split()
    host = words[0].rstrip(".").lower() if words else ""
    if not _HOST_NAME.fullmatch(host):
        return None
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) > 2 else host


def build_probes(local: str, foreign: str, server_ip: str) -> list[Probe]:
    """Every probe, in the order run: the plain foreign recipient from each sender kind first
    (the seeds' telnet test), then each trick from a local sender, the pretence the seeds
    single out ("even though we pretended that the sender was from our own domain")."""
    own = address_literal(server_ip)
    senders = {"null": "", "local": f"postmaster@{local}", "foreign": f"{USER}@{foreign}"}
    u, f, loc = USER, foreign, local
    plain = [Probe("plain foreign", kind, sender, f"TO:<{u}@{f}>") for kind, sender in senders.items()]
    tricks = [
        ("no angle brackets", f"TO: {u}@{f}"),
        ("upper-case domain", f"TO:<{u.upper()}@{f.upper()}>"),
        ("trailing dot", f"TO:<{u}@{f}.>"),
        ("postmaster", f"TO:<postmaster@{f}>"),
        ("quoted local part", f'TO:<"{u}"@{f}>'),
        ("local domain as label", f"TO:<{u}@{loc}.{f}>"),
        ("percent hack", f"TO:<{u}%{f}@{loc}>"),
        ("percent hack, own literal", f"TO:<{u}%{f}@{own}>"),
        ("percent hack, unqualified", f"TO:<{u}%{f}>"),
        ("bang path", f"TO:<{f}!{u}@{loc}>"),
        ("bang path, unqualified", f"TO:<{f}!{u}>"),
        ("source route", f"TO:<@{loc}:{u}@{f}>"),
        ("source route, two hops", f"TO:<@{own},@{loc}:{u}@{f}>"),
        ("double @", f"TO:<{u}@{f}@{loc}>"),
        ("double @, own literal", f"TO:<{u}@{f}@{own}>"),
        ("trailing @", f"TO:<{u}@{f}@>"),
        ('quoted "@"', f'TO:<"{u}@{f}"@{loc}>'),
        ('quoted "%"', f'TO:<"{u}%{f}"@{loc}>'),
        ('quoted "!"', f'TO:<"{f}!{u}"@{loc}>'),
        ("IP literal", f"TO:<{u}@[{FOREIGN_LITERAL}]>"),
        ("IPv6 literal", f"TO:<{u}@[IPv6:{FOREIGN_LITERAL6}]>"),
        ("Exchange IMCEA", f"TO:<IMCEASMTP-{u}+40{f}@{loc}>"),
    ]
    return plain + [Probe(name, "local", senders["local"], argument) for name, argument in tricks]


# -- the network ----------------------------------------------------------------------------------


def _text(message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return " ".join(line.strip() for line in text.splitlines())


class _Client(smtplib.SMTP):
    """smtplib's client, keeping the greeting it reads on connecting (the local domain's hint)."""

    greeting: bytes = b""

    def connect(self, host: str = "localhost", port: int = 0, source_address: tuple[str, int] | None = None,
                ) -> tuple[int, bytes]:
        code, message = super().connect(host, port, source_address)
        self.greeting = message
        return code, message


class _Closing(Exception):
    """The server said 421 or hung up mid-probe: the probe is retried on a new connection."""


class Prober:
    """One SMTP connection at a time to the server, renewed every few probes and whenever the
    server closes it, so its error limits never decide a later probe's verdict."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.client: _Client | None = None
        self.used = 0
        self.greeting = ""
        self.peer = ""
        self.tls: str | None = None

    def connect(self) -> None:
        options = self.options
        source = (options.source, 0) if options.source else None
        try:
            client = _Client(options.host, options.port, options.helo or socket.gethostname(), options.timeout,
                             source)
        except (OSError, smtplib.SMTPException) as error:
            raise ProbeError(f"connecting: {_describe(error)}") from None
        self.greeting = _text(client.greeting)
        step = "EHLO/HELO"
        try:
            self.peer = client.sock.getpeername()[0]  # type: ignore[union-attr]
            client.ehlo_or_helo_if_needed()
            if options.starttls:
                step = "STARTTLS"
                if not client.has_extn("starttls"):
                    raise ProbeError("the server does not offer STARTTLS")
                client.starttls(context=_unverified_context())
                client.ehlo()
                self.tls = client.sock.version()  # type: ignore[union-attr]
        except ProbeError:
            client.close()
            raise
        except (OSError, smtplib.SMTPException) as error:
            client.close()
            raise ProbeError(f"{step}: {_describe(error)}") from None
        self.client, self.used = client, 0

    def close(self, quit: bool = True) -> None:
        """End the connection, with QUIT unless the server already went away."""
        if self.client is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                if quit:
                    self.client.quit()
            self.client.close()
            self.client = None

    def run(self, probe: Probe) -> Outcome:
        """One probe, retried once on a fresh connection if the server closed the first."""
        why = ""
        for _ in range(2):
            if self.client is None or self.used >= PROBES_PER_CONNECTION:
                self.close()
                self.connect()
            try:
                return self._attempt(probe)
            except _Closing as closing:
                why = str(closing)
                self.close(quit=False)
        return Outcome(probe, ERROR, "", None, why)

    def _command(self, verb: str, argument: str) -> tuple[int, str]:
        assert self.client is not None
        try:
            code, message = self.client.docmd(verb, argument)
        except (OSError, smtplib.SMTPException) as error:  # hung up, timed out, or a garbled reply
            raise _Closing(f"{verb}: {_describe(error)}") from None
        if code == 421:
            raise _Closing(f"{verb}: {code} {_text(message)}")
        return code, _text(message)

    def _attempt(self, probe: Probe) -> Outcome:
        self.used += 1
        code, text = self._command("MAIL", f"FROM:<{probe.sender}>")
        if 200 <= code < 300:
            stage = "RCPT"
            code, text = self._command("RCPT", probe.argument)
        else:
            stage = "MAIL"
        verdict = OPEN if stage == "RCPT" and 200 <= code < 300 else CLOSED
        try:
            self._command("RSET", "")
        except _Closing:
            self.close(quit=False)  # the verdict stands; the next probe connects again
        return Outcome(probe, verdict, stage, code, text)


def _unverified_context() -> ssl.SSLContext:
    # A diagnosis tool must reach servers with self-signed, expired or mismatched certificates.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _describe(error: BaseException) -> str:
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {_text(error.smtp_error)}"
    return str(error) or type(error).__name__


def run(options: Options) -> Report:
    """Probe the server; :class:`ProbeError` when it cannot be probed at all. A server lost
    half-way leaves the remaining probes as errors rather than failing the whole report."""
    prober = Prober(options)
    prober.connect()
    try:
        local = options.local_domain or domain_from_greeting(prober.greeting)
        if local is None or local == options.foreign_domain:
            local = FALLBACK_LOCAL_DOMAIN
        report = Report(f"{options.host}:{options.port}", prober.greeting, local, options.foreign_domain,
                        address_literal(prober.peer), prober.tls)
        lost = ""
        for probe in build_probes(local, options.foreign_domain, prober.peer):
            try:
                report.outcomes.append(prober.run(probe) if not lost else Outcome(probe, ERROR, "", None, lost))
            except ProbeError as error:
                lost = f"not run: reconnecting failed: {error}"
                report.outcomes.append(Outcome(probe, ERROR, "", None, lost))
    finally:
        prober.close()
    return report


# -- the output -----------------------------------------------------------------------------------


def _where(report: Report) -> str:
    return f"inside TLS ({report.tls}, certificate not verified)" if report.tls else "in plaintext"


def summary(report: Report) -> str:
    counts = (f"{len(report.outcomes)} probes {_where(report)}: {report.count(OPEN)} open, "
              f"{report.count(CLOSED)} closed, {report.count(ERROR)} not completed")
    refused_at_mail = sum(outcome.stage == "MAIL" for outcome in report.outcomes)
    if refused_at_mail:
        counts += f" ({refused_at_mail} refused at MAIL: their recipients were not tried)"
    if report.count(OPEN):
        return f"{counts}. OPEN RELAY: the server accepted foreign recipients"
    if report.count(ERROR):
        return f"{counts}. Inconclusive: some probes could not be completed"
    return f"{counts}. No relay found"


def format_table(report: Report) -> str:
    lines = [
        f"server {report.server} {_where(report)}; greeting: {report.greeting}",
        f"local domain {report.local_domain}, foreign domain {report.foreign_domain}, "
        f"server literal {report.server_literal}; no DATA is ever sent",
        "",
    ]
    rows = [("VERDICT", "FORM", "SENDER", "RECIPIENT AS SENT", "REPLY")]
    for outcome in report.outcomes:
        probe = outcome.probe
        reply = f"{outcome.code} {outcome.text}" if outcome.code is not None else outcome.text
        if outcome.stage == "MAIL":
            reply = f"MAIL refused: {reply}"
        sender = f"{probe.sender_kind} <{probe.sender}>"
        rows.append((outcome.verdict.upper() if outcome.verdict == OPEN else outcome.verdict, probe.form, sender,
                     probe.recipient, reply))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4]
              for row in rows]
    lines += ["", summary(report)]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    document = {key: value for key, value in asdict(report).items() if key != "outcomes"}
    document["probes"] = [
        {"form": o.probe.form, "sender_kind": o.probe.sender_kind, "sender": o.probe.sender,
         "recipient": o.probe.recipient, "command": f"RCPT {o.probe.argument}", "verdict": o.verdict,
         "stage": o.stage, "code": o.code, "reply": o.text}
        for o in report.outcomes
    ]
    document["summary"] = {"probes": len(report.outcomes), "open": report.count(OPEN),
                           "closed": report.count(CLOSED), "errors": report.count(ERROR),
                           "open_relay": bool(report.count(OPEN)), "text": summary(report)}
    return json.dumps(document, indent=2)


# -- the command ----------------------------------------------------------------------------------


REMOTE_OPTIONS = ("source", "starttls", "json", "helo", "local_domain", "foreign_domain", "timeout")


def remote_requested(args: argparse.Namespace) -> bool:
    # "is not", not "in": --timeout 0 compares equal to False and must still count as given.
    values = [getattr(args, name) for name in REMOTE_OPTIONS]
    return args.server is not None or any(value is not None and value is not False for value in values)


def command(args: argparse.Namespace, usage_error: Callable[[str], NoReturn]) -> int:
    """``check-relay --server``: returns the exit status; ``usage_error`` exits 2."""
    from edgeproxy.parsers import parse_host_port

    if args.server is None:
        usage_error("--source, --starttls, --json, --helo, --local-domain, --foreign-domain and --timeout "
                    "need --server")
    if args.client is not None or args.authenticated or args.relay_listener:
        usage_error("--server probes a live server: it takes no CLIENT RECIPIENT, --authenticated or "
                    "--relay-listener")
    try:
        host, port = parse_host_port(args.server)
    except ValueError as error:
        usage_error(f"--server {args.server!r}: {error}")
    if args.source is not None:
        try:
            ipaddress.ip_address(args.source)
        except ValueError:
            usage_error(f"--source {args.source!r}: not an IP address")
    foreign = (args.foreign_domain or DEFAULT_FOREIGN_DOMAIN).lower().rstrip(".")
    local = args.local_domain.lower().rstrip(".") if args.local_domain else None
    for name, domain in (("--foreign-domain", foreign), ("--local-domain", local)):
        if domain is not None and not _HOST_NAME.fullmatch(domain):
            usage_error(f"{name} {domain!r}: not a domain name (ASCII, A-label form)")
    if local == foreign:
        usage_error("--local-domain and --foreign-domain must differ")
    if args.helo is not None and not re.fullmatch(r"[!-~]+", args.helo):
        usage_error(f"--helo {args.helo!r}: one word of printable ASCII")
    timeout = 10.0 if args.timeout is None else args.timeout
    if not 0 < timeout <= 3600:
        usage_error("--timeout: seconds, more than 0 and at most 3600")
    options = Options(host, port, args.source, args.starttls, args.helo, local, foreign, timeout)
    try:
        report = run(options)
    except ProbeError as error:
        print(f"edgeproxy check-relay: {args.server}: {error}", file=sys.stderr)
        return 2
    print(to_json(report) if args.json else format_table(report))
    return report.exit_status
