"""Settings from ``EDGEPROXY_*`` environment variables.

One table, :data:`VARIABLES`, names every variable with its parser, default and meaning; it drives
:meth:`Settings.from_env`, ``edgeproxy config`` and the table in README.md, so the three cannot
disagree. ``from_env`` is pure (it reads the mapping it is given, and list files named with
``@/path``) and reports every bad variable at once, one line each.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeproxy.errors import ConfigError
from edgeproxy.fastpath import parse_no_extensions
from edgeproxy.parsers import (
    choice_parser,
    int_parser,
    parse_addresses,
    parse_backend,
    parse_bool,
    parse_cidrs,
    parse_directory,
    parse_domains,
    parse_file,
    parse_hostname,
    parse_listeners,
    parse_optional_host_port,
    parse_redis_url,
    parse_required_listeners,
    parse_rewrite,
    parse_sender_deny,
    parse_users,
    parse_workers,
    seconds_parser,
)
from edgeproxy.refusals import POLICY_DEFAULTS, POLICY_INHERITS, POLICY_RULES
from edgeproxy.reply import Reply

PREFIX = "EDGEPROXY_"


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    name: str  # without the prefix
    parse: Callable[[str], Any]
    default: str
    meaning: str
    example: str = ""
    secret: bool = False

    @property
    def env(self) -> str:
        return PREFIX + self.name

    @property
    def attribute(self) -> str:
        return self.name.lower()


_SETTINGS_VARIABLES: tuple[Variable, ...] = (
    Variable("LISTEN", parse_required_listeners, "127.0.0.1:2525",
             "Addresses to accept SMTP on (IPv4 and [IPv6])", "0.0.0.0:25,[::]:25"),
    Variable("RELAY_LISTEN", parse_listeners, "",
             "Extra listeners whose clients may relay (Exchange's 'clients connecting to these "
             "internal addresses')", "10.0.0.5:25"),
    Variable("SUBMISSION_LISTEN", parse_listeners, "",
             "Mail submission listeners (RFC 6409, port 587): STARTTLS required before MAIL", "0.0.0.0:587"),
    Variable("SUBMISSIONS_LISTEN", parse_listeners, "",
             "Mail submission over implicit TLS (RFC 8314, port 465): TLS from the first byte", "0.0.0.0:465"),
    Variable("PROXY_PROTOCOL_FROM", parse_cidrs, "",
             "Load balancer CIDRs whose connections must start with a PROXY protocol v1/v2 header; the "
             "client address in it is the one every rule, limit and log sees. From anywhere else a PROXY "
             "header is refused", "10.0.0.2/32,10.0.0.3/32"),
    Variable("PROXY_PROTOCOL_TIMEOUT", seconds_parser(0.1), "5",
             "Seconds a load balancer has to send the PROXY header", "2"),
    Variable("TLS_CERT", parse_file, "",
             "PEM certificate (chain) for STARTTLS and implicit TLS; empty offers no TLS (the embedded "
             "defaults make a throwaway self-signed one)", "/etc/edgeproxy/tls/fullchain.pem"),
    Variable("TLS_KEY", parse_file, "", "PEM private key of TLS_CERT", "/etc/edgeproxy/tls/privkey.pem"),
    Variable("TLS_MIN_VERSION", choice_parser("1.2", "1.3"), "1.2", "Oldest TLS version accepted from clients", "1.3"),
    Variable("TLS_HANDSHAKE_TIMEOUT", seconds_parser(1), "30",
             "Seconds a client has to complete a TLS handshake", "10"),
    Variable("AUTH", choice_parser("off", "file", "backend"), "off",
             "SMTP AUTH inside TLS (PLAIN, LOGIN): verified against AUTH_USERS, or by the backend's own AUTH; "
             "authenticated clients may relay", "file"),
    Variable("AUTH_USERS", parse_users, "",
             "With AUTH=file: lines user:hash (argon2id or bcrypt; make them with `edgeproxy passwd USER`)",
             "@/etc/edgeproxy/users"),
    Variable("AUTH_FAILURE_DELAY", seconds_parser(0), "1",
             "Seconds before a failed AUTH is answered (other sessions are not held up)", "3"),
    Variable("AUTH_FAILURE_LIMIT", int_parser(1), "10",
             "AUTH failures from one client address in 10 minutes before further attempts get 454 4.7.0", "5"),
    Variable("BACKEND", parse_backend, "",
             "The real mail server; empty starts an embedded sink for trying edgeproxy out",
             "10.0.0.10:25"),
    Variable("HOSTNAME", parse_hostname, "",
             "Name in the greeting and the Received: header; empty uses the host's FQDN",
             "mx1.example.com"),
    Variable("LOCAL_DOMAINS", parse_domains, "example.test",
             "Domains we accept mail for; '.example.com' matches every subdomain",
             "example.com,.example.com"),
    Variable("RELAY_DOMAINS", parse_domains, "",
             "Domains relayed for anyone (backup MX)", "partner.example"),
    Variable("RELAY_ALLOW", parse_cidrs, "",
             "Client CIDRs that may relay to any domain", "10.0.0.0/8,2001:db8::/32"),
    Variable("RELAY_NEVER", parse_cidrs, "",
             "Client CIDRs that may never relay, whatever else allows it", "10.66.0.0/16"),
    Variable("CONNECT_ALLOW", parse_cidrs, "",
             "If set, only these client CIDRs may connect", "@/etc/edgeproxy/connect-allow"),
    Variable("CONNECT_DENY", parse_cidrs, "",
             "Client CIDRs refused at the greeting", "192.0.2.0/24"),
    Variable("RECIPIENTS", parse_addresses, "",
             "Recipient directory: for a local domain with any address listed, only listed "
             "addresses are accepted (others get 550 5.1.1 at RCPT)",
             "@/etc/edgeproxy/recipients"),
    Variable("VERIFY_RECIPIENTS", parse_bool, "no",
             "Remember the backend's verdict on each recipient of a local or relay domain without a "
             "directory: a recipient it refused as unknown (5.1.1) is then refused without asking it",
             "yes"),
    Variable("VERIFY_NEGATIVE_TTL", seconds_parser(1), "10800",
             "Seconds an unknown recipient is remembered (a 4xx is never remembered)", "3600"),
    Variable("VERIFY_POSITIVE_TTL", seconds_parser(1), "604800",
             "Seconds an accepted recipient is remembered", "86400"),
    Variable("VERIFY_CACHE_SIZE", int_parser(1), "100000",
             "Recipient verdicts remembered per worker; the least recently used go first", "1000000"),
    Variable("HARVEST_LIMIT", int_parser(0), "5",
             "Unknown-recipient refusals in a session before each further RCPT reply is delayed "
             "(directory-harvest defence); 0 = never", "3"),
    Variable("HARVEST_DELAY", seconds_parser(0), "5",
             "Seconds each RCPT reply is delayed past HARVEST_LIMIT (other clients are not held up)", "10"),
    Variable("REWRITE", parse_rewrite, "",
             "Domain rewrite map, applied before the local/relay decision", "dec.com=compaq.com"),
    Variable("SENDER_DENY", parse_sender_deny, "",
             "Senders refused at MAIL: addresses, domains, .wildcards", "spam@bad.example,.bad.example"),
    Variable("SOFT_REJECT", parse_bool, "no",
             "Turn every policy 5xx into 4xx (a safe first deployment)", "yes"),
    Variable("MAX_RECIPIENTS", int_parser(1), "100",
             "Recipients per message; more get 452 4.5.3", "1000"),
    Variable("MAX_MESSAGE_SIZE", int_parser(1), "10485760",
             "Message size limit in octets (advertised with SIZE, enforced)", "52428800"),
    Variable("MAX_LINE_LENGTH", int_parser(512, 65536), "512",
             "Command line limit in octets, CRLF included (RFC 5321 §4.5.3.1.4)", "2048"),
    Variable("MAX_BODY_LINE_LENGTH", int_parser(1000, 1 << 20), "2048",
             "Body line limit in octets, CRLF included; longer lines refuse the message", "1000"),
    Variable("MAX_ERRORS", int_parser(1), "20",
             "Errors and refusals per session before 421 and disconnect", "50"),
    Variable("RECIPIENT_OVERSHOOT_LIMIT", int_parser(0), "1000",
             "RCPTs past MAX_RECIPIENTS answered 452 in a transaction before each further one counts "
             "as an error (Postfix's smtpd_recipient_overshoot_limit)", "100"),
    Variable("JUNK_COMMAND_LIMIT", int_parser(1), "100",
             "NOOP, RSET, VRFY, HELP, EXPN and ETRN per session (until a message is delivered) before each "
             "further one counts as an error (Postfix's smtpd_junk_command_limit)", "20"),
    Variable("MAX_PENDING_INPUT", int_parser(4096), "65536",
             "Octets of a client's input held unanswered before the proxy stops reading from it", "262144"),
    Variable("MAX_PIPELINE", int_parser(1), "256",
             "Replies a client may be owed before its further commands wait until it reads them", "1000"),
    Variable("MAX_CONNECTIONS", int_parser(1), "1000",
             "Concurrent client connections per worker", "20000"),
    Variable("MAX_CONNECTIONS_PER_IP", int_parser(0), "50",
             "Concurrent connections from one client address per worker; 0 = no limit", "20"),
    Variable("CONNECTION_RATE", int_parser(0), "0",
             "New connections per client address per minute per worker; 0 = no limit", "120"),
    Variable("REDIS_URL", parse_redis_url, "",
             "Redis holding the per-client connection count and rate for every worker and node; empty "
             "keeps them per worker. Redis unwell: each worker falls back to its own counts",
             "redis://10.0.0.20:6379/0"),
    Variable("REDIS_TIMEOUT", seconds_parser(0.001), "0.05",
             "Seconds one Redis decision may take before the worker decides alone", "0.02"),
    Variable("GREETING_DELAY", seconds_parser(0), "0",
             "Seconds to wait before the greeting; a client talking first gets 554", "2"),
    Variable("TIMEOUT", seconds_parser(1), "300",
             "Seconds a client has for each command line, and to take a final reply "
             "(RFC 5321 §4.5.3.2.7)", "120"),
    Variable("DATA_TIMEOUT", seconds_parser(1), "180",
             "Seconds a client may stay silent inside DATA (RFC 5321 §4.5.3.2.5)", "180"),
    Variable("SESSION_TIMEOUT", seconds_parser(1), "3600",
             "Seconds a whole session may last, however busy it is", "1800"),
    Variable("BACKEND_TIMEOUT", seconds_parser(1), "300",
             "Seconds to wait for a backend reply; 600 after the body (RFC 5321 §4.5.3.2.6)", "120"),
    Variable("BACKEND_CONNECT_TIMEOUT", seconds_parser(0.1), "10",
             "Seconds to connect and read the backend's greeting", "5"),
    Variable("BACKEND_MAX_CONNECTIONS", int_parser(1), "100",
             "Backend connections open at once, in total: each worker gets its share (pooled and "
             "idle ones count; a transaction that finds none free waits)", "50"),
    Variable("BACKEND_QUEUE_TIMEOUT", seconds_parser(0.1), "30",
             "Seconds a transaction waits for a free backend connection before 451 4.3.2", "10"),
    Variable("BACKEND_IDLE_TIMEOUT", seconds_parser(1), "30",
             "Seconds an idle pooled backend connection is kept; the pool shrinks to recent demand", "60"),
    Variable("BACKEND_RETRY_INTERVAL", seconds_parser(0.1), "2",
             "Seconds after a failed backend connect during which transactions get 451 4.4.1 at once "
             "instead of a new attempt", "5"),
    Variable("BACKEND_TLS", choice_parser("no", "opportunistic", "required"), "opportunistic",
             "STARTTLS to the backend: when offered, always (else 451 4.7.5, never plaintext), or never",
             "required"),
    Variable("BACKEND_TLS_VERIFY", choice_parser("auto", "yes", "no"), "auto",
             "Verify the backend's certificate and name; auto = yes when BACKEND_TLS=required", "no"),
    Variable("BACKEND_TLS_CA", parse_file, "",
             "CA bundle for verifying the backend; empty uses the system's", "@/etc/edgeproxy/backend-ca.pem"),
    Variable("XCLIENT", parse_bool, "yes",
             "Announce the real client with XCLIENT when the backend offers it", "no"),
    Variable("RECEIVED_HEADER", parse_bool, "yes",
             "Prepend a Received: header naming the real client", "no"),
    Variable("ENABLE_EXPN", parse_bool, "no", "Pass EXPN to the backend instead of 502", "yes"),
    Variable("ENABLE_ETRN", parse_bool, "no", "Pass ETRN to the backend instead of 502", "yes"),
    Variable("LOOP", choice_parser("uvloop", "asyncio"), "uvloop", "Event loop", "asyncio"),
    Variable("WORKERS", parse_workers, "1",
             "Processes sharing the listeners (SO_REUSEPORT); 'auto' = one per core", "auto"),
    Variable("DRAIN_TIMEOUT", seconds_parser(0), "30",
             "Seconds SIGTERM waits for transactions in flight", "60"),
    Variable("SINK_DIR", parse_directory, "",
             "Where the embedded sink writes messages; empty makes a temporary directory",
             "/var/tmp/edgeproxy-sink"),
    Variable("METRICS_LISTEN", parse_optional_host_port, "",
             "Address serving /metrics (Prometheus, summed over workers), /healthz and /readyz; empty: off",
             "127.0.0.1:9525"),
    Variable("LOG_LEVEL", choice_parser("debug", "info", "warning", "error"), "info",
             "Least severe log level written", "debug"),
    Variable("LOG_FORMAT", choice_parser("auto", "json", "console"), "auto",
             "json, console, or auto (console on a terminal, else JSON)", "json"),
    Variable("NO_EXTENSIONS", parse_no_extensions, "no",
             "Run the pure-Python fast path instead of the compiled one", "1"),
)
_REPLY_VARIABLES = tuple(
    Variable(f"REPLY_{rule}", Reply.parse, str(POLICY_DEFAULTS[rule]) if rule in POLICY_DEFAULTS else "",
             f"Reply for the {rule.lower().replace('_', ' ')} rule"
             + (f" (default: as REPLY_{POLICY_INHERITS[rule]})" if rule in POLICY_INHERITS else ""),
             "450 4.7.1 Try later")
    for rule in POLICY_RULES
)
VARIABLES: tuple[Variable, ...] = (*_SETTINGS_VARIABLES, *_REPLY_VARIABLES)
_BY_ENV = {variable.env: variable for variable in VARIABLES}


@dataclass(frozen=True)
class Settings:
    listen: tuple[tuple[str, int], ...]
    relay_listen: tuple[tuple[str, int], ...]
    submission_listen: tuple[tuple[str, int], ...]
    submissions_listen: tuple[tuple[str, int], ...]
    proxy_protocol_from: tuple[str, ...]
    proxy_protocol_timeout: float
    tls_cert: str
    tls_key: str
    tls_min_version: str
    tls_handshake_timeout: float
    auth: str
    auth_users: str
    auth_failure_delay: float
    auth_failure_limit: int
    backend: tuple[str, int] | None
    hostname: str
    local_domains: tuple[str, ...]
    relay_domains: tuple[str, ...]
    relay_allow: tuple[str, ...]
    relay_never: tuple[str, ...]
    connect_allow: tuple[str, ...]
    connect_deny: tuple[str, ...]
    recipients: tuple[str, ...]
    verify_recipients: bool
    verify_negative_ttl: float
    verify_positive_ttl: float
    verify_cache_size: int
    harvest_limit: int
    harvest_delay: float
    rewrite: tuple[tuple[str, str], ...]
    sender_deny: tuple[str, ...]
    soft_reject: bool
    max_recipients: int
    max_message_size: int
    max_line_length: int
    max_body_line_length: int
    max_errors: int
    recipient_overshoot_limit: int
    junk_command_limit: int
    max_pending_input: int
    max_pipeline: int
    max_connections: int
    max_connections_per_ip: int
    connection_rate: int
    redis_url: str
    redis_timeout: float
    greeting_delay: float
    timeout: float
    data_timeout: float
    session_timeout: float
    backend_timeout: float
    backend_connect_timeout: float
    backend_max_connections: int
    backend_queue_timeout: float
    backend_idle_timeout: float
    backend_retry_interval: float
    backend_tls: str
    backend_tls_verify: str
    backend_tls_ca: str
    xclient: bool
    received_header: bool
    enable_expn: bool
    enable_etrn: bool
    loop: str
    workers: int
    drain_timeout: float
    sink_dir: str
    metrics_listen: tuple[str, int] | None
    log_level: str
    log_format: str
    no_extensions: bool
    replies: Mapping[str, Reply] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from ``environ``; raise ConfigError listing every bad variable."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        replies: dict[str, Reply] = {}
        for variable in VARIABLES:
            raw = environ.get(variable.env)
            text = variable.default if raw is None else raw
            if variable.name.startswith("REPLY_") and not text.strip():
                if not variable.default:
                    continue  # inherits; resolved below
                text = variable.default  # set but empty: the default, as if unset
            try:
                value = variable.parse(text)
            except ValueError as error:
                shown = "<redacted>" if variable.secret else repr(raw)
                problems.append(f"{variable.env}={shown}: {error}")
                continue
            if variable.name.startswith("REPLY_"):
                replies[variable.name[len("REPLY_") :]] = value
            else:
                values[variable.attribute] = value
        longest_line = values.get("max_line_length", 0)
        if values.get("auth", "off") != "off":
            longest_line = max(longest_line, 12290)  # RFC 4954 §4: AUTH lines of 12,288 octets
        if values.get("max_pending_input", 1 << 62) < longest_line:
            # Else a command line of legal length could never be held whole: the session would
            # stop reading before its end and wait for it forever.
            problems.append(f"{PREFIX}MAX_PENDING_INPUT={environ.get(PREFIX + 'MAX_PENDING_INPUT')!r}: "
                            f"must be at least the longest command line ({longest_line} octets)")
        problems += _tls_problems(values, environ)
        if values.get("proxy_protocol_from") and values.get("submissions_listen"):
            # On an implicit-TLS listener the TLS layer owns the first byte, where the header is.
            problems.append(f"{PREFIX}PROXY_PROTOCOL_FROM={environ.get(PREFIX + 'PROXY_PROTOCOL_FROM')!r}: not "
                            f"supported with {PREFIX}SUBMISSIONS_LISTEN (balance 465 without it, or use 587)")
        if values.get("auth") == "file" and "auth_users" in values and not values["auth_users"]:
            problems.append(f"{PREFIX}AUTH_USERS={environ.get(PREFIX + 'AUTH_USERS', '')!r}: needed with "
                            f"{PREFIX}AUTH=file")
        for name in sorted(set(environ) - set(_BY_ENV)):
            if name.startswith(PREFIX) and not _SERVICE_LINK.fullmatch(name):
                problems.append(f"{name}={environ[name]!r}: unknown variable (misspelt?)")
        if problems:
            raise ConfigError(problems)
        for rule, parent in POLICY_INHERITS.items():
            replies.setdefault(rule, replies[parent])
        if values["soft_reject"]:
            replies = {rule: reply.softened() for rule, reply in replies.items()}
        if not values["hostname"]:
            values["hostname"] = socket.getfqdn()
        return cls(**values, replies=replies)

    @property
    def backend_verify(self) -> bool:
        if self.backend_tls_verify == "auto":
            return self.backend_tls == "required"
        return self.backend_tls_verify == "yes"

    def describe(self) -> list[tuple[str, str]]:
        """(variable, effective value) for every setting, secrets redacted, as ``config`` prints."""
        rows = []
        for variable in VARIABLES:
            if variable.name.startswith("REPLY_"):
                rows.append((variable.env, str(self.replies[variable.name[len("REPLY_") :]])))
                continue
            value = getattr(self, variable.attribute)
            rows.append((variable.env, "<redacted>" if variable.secret and value else _show(value)))
        return rows


# What Kubernetes puts in a pod's environment for a Service named "edgeproxy" (service links):
# not ours, not misspelt, so not a reason to refuse to start.
_SERVICE_LINK = re.compile(
    rf"{PREFIX}(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)")


def _tls_problems(values: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """The TLS settings that only make sense together; the pair is loaded, as the server will."""
    from edgeproxy.tls import server_context

    cert, key = values.get("tls_cert"), values.get("tls_key")
    if cert is None or key is None:
        return []  # already reported
    if bool(cert) != bool(key):
        missing = "TLS_KEY" if cert else "TLS_CERT"
        return [f"{PREFIX}{missing}={environ.get(PREFIX + missing, '')!r}: needed with "
                f"{PREFIX}{'TLS_CERT' if cert else 'TLS_KEY'}"]
    if cert:
        try:
            server_context(cert, key, values.get("tls_min_version", "1.2"))
        except ValueError as error:
            return [f"{PREFIX}TLS_KEY={key!r}: {error} ({PREFIX}TLS_CERT={cert!r})"]
    elif values.get("backend") is not None:
        # (On the embedded defaults a throwaway certificate is made at start-up.)
        needing = [name for name in ("SUBMISSION_LISTEN", "SUBMISSIONS_LISTEN") if values.get(name.lower())]
        if values.get("auth", "off") != "off":
            needing.append("AUTH")  # offered only inside TLS
        return [f"{PREFIX}{name}={environ.get(PREFIX + name)!r}: needs {PREFIX}TLS_CERT and {PREFIX}TLS_KEY"
                for name in needing]
    return []


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return ""
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            return _show_pair(value)  # one host:port
        return ",".join(_show_pair(item) if isinstance(item, tuple) else str(item) for item in value)
    return str(value)


def _show_pair(pair: tuple[str, int] | tuple[str, str]) -> str:
    first, second = pair
    if isinstance(second, int):
        return f"[{first}]:{second}" if ":" in first else f"{first}:{second}"
    return f"{first}={second}"


def markdown_table() -> str:
    """The README's configuration table."""
    lines = ["| Variable | Meaning | Default | Example |", "|---|---|---|---|"]
    for variable in VARIABLES:
        default = f"`{variable.default}`" if variable.default else "(empty)"
        lines.append(f"| `{variable.env}` | {variable.meaning} | {default} | `{variable.example}` |")
    return "\n".join(lines)


