"""The pure-Python fast path: the reference semantics for ``_fastpath/_fastpath.pyx``.

Everything here runs per line, per RCPT or per body chunk. The compiled twin must give the same
results and raise the same exceptions for every input; ``tests/test_fastpath_differential.py``
checks that on generated input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import idna
import pytricia

from edgeproxy.fastpath_common import (
    ACTION_FORWARD,
    ACTION_REJECT,
    ENC_BANG,
    ENC_IMCEA,
    ENC_IP_LITERAL,
    ENC_MULTIPLE_AT,
    ENC_PERCENT,
    ENC_QUOTED,
    ENC_SOURCE_ROUTE,
    ENC_TRAILING,
    GRANT_ALLOW_LIST,
    GRANT_AUTHENTICATED,
    GRANT_LISTENER,
    GRANT_NEVER,
    MAX_DOMAIN,
    MAX_LABEL,
    MAX_LOCAL_PART,
    MAX_PATH,
    REASON_BAD_DOMAIN,
    REASON_BAD_PARAMETER,
    REASON_BAD_UTF8,
    REASON_BARE_CR,
    REASON_BARE_LF,
    REASON_EIGHT_BIT,
    REASON_LINE_TOO_LONG,
    REASON_NUL,
    REASON_NULL_RECIPIENT,
    REASON_PATH_TOO_LONG,
    REASON_SYNTAX,
    RULE_ENCAPSULATED,
    RULE_LOCAL,
    RULE_LOCAL_DIRECTORY,
    RULE_RELAY_ALLOW_LIST,
    RULE_RELAY_AUTHENTICATED,
    RULE_RELAY_DENIED,
    RULE_RELAY_DOMAIN,
    RULE_RELAY_LISTENER,
    RULE_RELAY_NEVER,
    RULE_UNKNOWN_USER,
    VIOLATION_BARE_CR,
    VIOLATION_BARE_LF,
    VIOLATION_LINE_TOO_LONG,
    VIOLATION_NONE,
    VIOLATION_NUL,
    VIOLATION_TOO_BIG,
    ParsedPath,
    ParseError,
    RcptVerdict,
    local_key,
)

# RFC 5322 atext, plus the dot of a dot-string.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~.")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_PARAM_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_IMCEA_TYPE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


# ---------------------------------------------------------------------------------------------
# Command lines


def parse_command(line: bytes, smtputf8: bool, max_length: int) -> tuple[str, str]:
    """Split one command line, CRLF included, into an upper-case verb and its argument.

    Refuses what would let two parsers disagree: a CR or LF that is not the final CRLF, NUL,
    8-bit bytes unless SMTPUTF8 is on offer, invalid UTF-8, and lines over ``max_length``.
    """
    if len(line) > max_length:
        raise ParseError(REASON_LINE_TOO_LONG)
    if not line.endswith(b"\r\n"):
        if line.endswith(b"\n"):
            raise ParseError(REASON_BARE_LF)
        raise ParseError(REASON_SYNTAX)
    body = line[:-2]
    if b"\r" in body:
        raise ParseError(REASON_BARE_CR)
    if b"\n" in body:
        raise ParseError(REASON_BARE_LF)
    if b"\x00" in body:
        raise ParseError(REASON_NUL)
    if body.isascii():
        text = body.decode("ascii")
    elif not smtputf8:
        raise ParseError(REASON_EIGHT_BIT)
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(REASON_BAD_UTF8) from None
    space = text.find(" ")
    if space < 0:
        return text.upper(), ""
    # Trailing blanks are a common client slip, not an attack; leading ones are kept so that
    # "MAIL FROM: <a>" still parses as the path parser allows.
    return text[:space].upper(), text[space + 1 :].rstrip(" ")


# ---------------------------------------------------------------------------------------------
# Domains


def canonical_domain(text: str) -> str:
    """Lower-case, IDNA A-label form of a domain or address literal, without a trailing dot.

    Raises ParseError(REASON_BAD_DOMAIN) for anything that is not a valid domain or literal.
    """
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ParseError(REASON_BAD_DOMAIN)
    if text[0] == "[":
        return _canonical_literal(text)
    if not text.isascii():
        # IDNA 2008 with UTS 46 mapping, as mail software does today: "ß" stays a letter of its
        # own (xn--strae-oqa) instead of IDNA 2003's "ss".
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ParseError(REASON_BAD_DOMAIN) from None
    text = text.lower()
    if len(text) > MAX_DOMAIN:
        raise ParseError(REASON_BAD_DOMAIN)
    for label in text.split("."):
        if not label or len(label) > MAX_LABEL or label[0] == "-" or label[-1] == "-":
            raise ParseError(REASON_BAD_DOMAIN)
        for char in label:
            if char not in _LDH:
                raise ParseError(REASON_BAD_DOMAIN)
    return text


def _canonical_literal(text: str) -> str:
    if len(text) < 3 or text[-1] != "]":
        raise ParseError(REASON_BAD_DOMAIN)
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return "[ipv6:" + ipaddress.IPv6Address(inner[5:]).compressed + "]"
        return "[" + str(ipaddress.IPv4Address(inner)) + "]"
    except ValueError:
        raise ParseError(REASON_BAD_DOMAIN) from None


class DomainSet:
    """Exact domains and ``.suffix`` wildcards (which match every subdomain, not the apex)."""

    def __init__(self, entries: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        for entry in entries:
            entry = entry.strip()
            try:
                if entry.startswith("."):
                    suffixes.add("." + canonical_domain(entry[1:]))
                else:
                    exact.add(canonical_domain(entry))
            except ParseError:
                raise ValueError(f"invalid domain {entry!r}") from None
        self._exact = frozenset(exact)
        self._suffixes = frozenset(suffixes)

    def __contains__(self, domain: object) -> bool:
        """``domain`` must already be canonical (as ParsedPath.domain is)."""
        if not isinstance(domain, str):
            return False
        if domain in self._exact:
            return True
        if self._suffixes:
            dot = domain.find(".")
            while dot >= 0:
                if domain[dot:] in self._suffixes:
                    return True
                dot = domain.find(".", dot + 1)
        return False

    def __len__(self) -> int:
        return len(self._exact) + len(self._suffixes)

    def entries(self) -> list[str]:
        return sorted(self._exact) + sorted(self._suffixes)


# ---------------------------------------------------------------------------------------------
# Paths


def parse_mail_from(arg: str) -> ParsedPath:
    """Parse the argument of ``MAIL`` (``FROM:<path> params``); ``<>`` is the null path."""
    if arg[:5].upper() != "FROM:":
        raise ParseError(REASON_SYNTAX)
    return _parse_path(arg, 5, False)


def parse_rcpt_to(arg: str) -> ParsedPath:
    """Parse the argument of ``RCPT`` (``TO:<path> params``); ``<postmaster>`` has no domain."""
    if arg[:3].upper() != "TO:":
        raise ParseError(REASON_SYNTAX)
    return _parse_path(arg, 3, True)


def _parse_path(arg: str, start: int, recipient: bool) -> ParsedPath:
    # RFC 5321 has no space after the colon; enough clients send one that refusing it would
    # only hurt users, and it cannot make two parsers disagree about the address.
    while start < len(arg) and arg[start] == " ":
        start += 1
    if start >= len(arg) or arg[start] != "<":
        raise ParseError(REASON_SYNTAX)
    position = start + 1
    flags = 0
    if position < len(arg) and arg[position] == "@":
        colon = arg.find(":", position)
        if colon < 0:
            raise ParseError(REASON_SYNTAX)
        _check_source_route(arg[position:colon])
        flags |= ENC_SOURCE_ROUTE
        position = colon + 1
    if position < len(arg) and arg[position] == '"':
        local, position, quoted_flags = _parse_quoted_local(arg, position)
        flags |= quoted_flags
        close = arg.find(">", position)
        if close < 0:
            raise ParseError(REASON_SYNTAX)
        if position == close:
            raise ParseError(REASON_SYNTAX)  # a quoted local part needs a domain
        if arg[position] != "@":
            raise ParseError(REASON_SYNTAX)
        domain_text = arg[position + 1 : close]
        if "@" in domain_text:
            raise ParseError(REASON_SYNTAX)
        mailbox_length = close - start - 1
    else:
        close = arg.find(">", position)
        if close < 0:
            raise ParseError(REASON_SYNTAX)
        mailbox = arg[position:close]
        mailbox_length = close - start - 1
        if not mailbox:
            if flags:
                raise ParseError(REASON_SYNTAX)
            if recipient:
                raise ParseError(REASON_NULL_RECIPIENT)
            return ParsedPath("", "", "", 0, _parse_params(arg, close + 1))
        if mailbox.endswith("@") and "@" in mailbox[:-1]:
            # A trailing "@" is an encapsulation, decided like a trailing dot: flagged, then
            # dropped, so that every rule still sees the real domain.
            flags |= ENC_TRAILING
            mailbox = mailbox[:-1]
        at = mailbox.rfind("@")
        if at < 0:
            if recipient and not flags and mailbox.lower() == "postmaster":
                return ParsedPath(mailbox, mailbox, "", 0, _parse_params(arg, close + 1))
            raise ParseError(REASON_SYNTAX)
        local = mailbox[:at]
        domain_text = mailbox[at + 1 :]
        flags |= _check_dot_string(local)
    if mailbox_length > MAX_PATH:
        raise ParseError(REASON_PATH_TOO_LONG)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise ParseError(REASON_PATH_TOO_LONG)
    if not domain_text:
        flags |= ENC_TRAILING
        domain = ""
    else:
        if domain_text.endswith("."):
            flags |= ENC_TRAILING
        domain = canonical_domain(domain_text)
        if domain[0] == "[":
            flags |= ENC_IP_LITERAL
    params = _parse_params(arg, close + 1)
    address = local + "@" + domain if domain else local
    return ParsedPath(address, local, domain, flags, params)


def _check_source_route(route: str) -> None:
    for hop in route.split(","):
        if len(hop) < 2 or hop[0] != "@":
            raise ParseError(REASON_SYNTAX)
        canonical_domain(hop[1:])


def _parse_quoted_local(arg: str, position: int) -> tuple[str, int, int]:
    """Return the quoted local part as written, the index after it, and its flags."""
    index = position + 1
    flags = 0
    while index < len(arg):
        char = arg[index]
        if char == '"':
            quoted = arg[position : index + 1]
            # Quoting changes no mailbox: "IMCEASMTP-u+40far"@local is as foreign as unquoted.
            if _is_imcea(local_key(quoted)):
                flags |= ENC_IMCEA
            return quoted, index + 1, flags
        if char == "\\":
            index += 1
            if index >= len(arg):
                break
            char = arg[index]
        code = ord(char)
        if code < 32 or code == 127:
            raise ParseError(REASON_SYNTAX)
        if char == "@" or char == "%" or char == "!":
            flags = ENC_QUOTED
        index += 1
    raise ParseError(REASON_SYNTAX)


def _check_dot_string(local: str) -> int:
    """Validate an unquoted local part (``@`` allowed as an encapsulation) and return flags."""
    if not local:
        raise ParseError(REASON_SYNTAX)
    flags = 0
    previous = "."
    for char in local:
        if char == "@":
            flags |= ENC_MULTIPLE_AT
        elif char == "%":
            flags |= ENC_PERCENT
        elif char == "!":
            flags |= ENC_BANG
        elif char not in _ATEXT and ord(char) < 128:
            raise ParseError(REASON_SYNTAX)
        if char == "." and previous in ".@":
            raise ParseError(REASON_SYNTAX)
        previous = char
    if previous == ".":
        raise ParseError(REASON_SYNTAX)
    if flags & ENC_MULTIPLE_AT and (local[0] == "@" or local[-1] == "@"):
        flags |= ENC_TRAILING
    if _is_imcea(local):
        flags |= ENC_IMCEA
    return flags


def _is_imcea(local: str) -> bool:
    """Exchange's IMCEA<type>-<encoded address> form: the backend may decode it to anywhere."""
    if local[:5].upper() != "IMCEA":
        return False
    index = 5
    while index < len(local) and local[index].upper() in _IMCEA_TYPE:
        index += 1
    return index < len(local) and local[index] == "-"


def _parse_params(arg: str, position: int) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if position >= len(arg):
        return params
    if arg[position] != " ":
        raise ParseError(REASON_SYNTAX)
    for token in arg[position + 1 :].split(" "):
        if not token:
            continue  # runs of blanks between parameters
        equals = token.find("=")
        key = token if equals < 0 else token[:equals]
        if not key or key[0] == "-":
            raise ParseError(REASON_BAD_PARAMETER)
        for char in key:
            if char not in _PARAM_KEY:
                raise ParseError(REASON_BAD_PARAMETER)
        if equals < 0:
            params[key.upper()] = None
            continue
        value = token[equals + 1 :]
        if not value:
            raise ParseError(REASON_BAD_PARAMETER)
        for char in value:
            code = ord(char)
            if code < 33 or code == 61 or code == 127:
                raise ParseError(REASON_BAD_PARAMETER)
        params[key.upper()] = value
    return params


# ---------------------------------------------------------------------------------------------
# Addresses


class CidrSet:
    """IPv4 and IPv6 prefixes in two patricia tries; IPv4-mapped clients match IPv4 entries."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)
        for entry in entries:
            entry = entry.strip()
            try:
                if "%" in entry:
                    raise ValueError("a scope ID names an interface, not client addresses")
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"invalid address or prefix {entry!r}") from None
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
                else:
                    self._v6[str(network)] = True
                    continue
            self._v4[str(network)] = True

    def __contains__(self, address: object) -> bool:
        """``address`` is a client address as the socket reports it."""
        if not isinstance(address, str):
            return False
        if ":" not in address:
            return address in self._v4
        if "%" in address:
            address = address[: address.find("%")]
        if address[:7].lower() == "::ffff:" and "." in address:
            return address[7:] in self._v4
        return address in self._v6

    def __len__(self) -> int:
        return len(self._v4) + len(self._v6)


# ---------------------------------------------------------------------------------------------
# The RCPT verdict


class RcptMatcher:
    """Design.md §2 "At RCPT TO", rules 1 to 6, in one call per recipient.

    Built once from settings and never mutated: a reload builds a new matcher and swaps it in.
    ``directories`` maps a canonical domain to the lower-case local parts that exist there.
    """

    def __init__(
        self,
        local_domains: DomainSet,
        relay_domains: DomainSet,
        rewrite: Mapping[str, str],
        directories: Mapping[str, frozenset[str]],
    ) -> None:
        self._local = local_domains
        self._relay = relay_domains
        self._rewrite = dict(rewrite)
        self._directories = dict(directories)

    def decide(self, arg: str, grant: int) -> RcptVerdict:
        """Decide one ``RCPT`` argument for a session holding ``grant`` (a ``GRANT_*``).

        Raises ParseError for a syntax error (rule 1); every policy outcome is a returned value.
        """
        path = parse_rcpt_to(arg)
        domain = path.domain
        flags = path.flags
        if flags & ENC_IP_LITERAL and domain in self._local:
            flags &= ~ENC_IP_LITERAL
        may_relay = grant in (GRANT_AUTHENTICATED, GRANT_ALLOW_LIST, GRANT_LISTENER)
        if flags and not may_relay:
            rule = RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_ENCAPSULATED
            return RcptVerdict(ACTION_REJECT, rule, path.address, domain, path.params)
        address = path.address
        if not domain:
            if flags:
                raise ParseError(REASON_SYNTAX)  # "user@": no domain to decide on
            # <postmaster> (RFC 5321 §4.5.1) is always ours.
            return RcptVerdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
        target = self._rewrite.get(domain)
        if target is not None:
            domain = target
            address = path.local + "@" + domain
        if domain in self._local:
            directory = self._directories.get(domain)
            if directory is None:
                return RcptVerdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
            if local_key(path.local) in directory:
                return RcptVerdict(ACTION_FORWARD, RULE_LOCAL_DIRECTORY, address, domain, path.params)
            return RcptVerdict(ACTION_REJECT, RULE_UNKNOWN_USER, address, domain, path.params)
        if domain in self._relay:
            return RcptVerdict(ACTION_FORWARD, RULE_RELAY_DOMAIN, address, domain, path.params)
        if grant == GRANT_AUTHENTICATED:
            return RcptVerdict(ACTION_FORWARD, RULE_RELAY_AUTHENTICATED, address, domain, path.params)
        if grant == GRANT_ALLOW_LIST:
            return RcptVerdict(ACTION_FORWARD, RULE_RELAY_ALLOW_LIST, address, domain, path.params)
        if grant == GRANT_LISTENER:
            return RcptVerdict(ACTION_FORWARD, RULE_RELAY_LISTENER, address, domain, path.params)
        rule = RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_RELAY_DENIED
        return RcptVerdict(ACTION_REJECT, rule, address, domain, path.params)


# ---------------------------------------------------------------------------------------------
# The DATA scanner


class DataScanner:
    """Finds the end of a DATA body as chunks arrive, and what is wrong with it on the way.

    Only ``CRLF . CRLF`` ends the body: a bare CR or LF is a violation, never a line end, so no
    "\\n.\\r\\n" trick can end the message here while the backend sees it go on (or the
    reverse). A NUL octet anywhere is a violation too: a backend that drops NULs would read a
    line "\\x00." as the end marker. The scan starts just after the ``DATA`` command line, at
    the start of a line. The first violation seen is kept; scanning goes on to find the end
    marker all the same, and a NUL counts in the line length and the size as any other octet.
    """

    def __init__(self, max_line_length: int, max_size: int) -> None:
        self.max_line_length = max_line_length
        self.max_size = max_size
        self.violation = VIOLATION_NONE
        self.size = 0  # body octets so far; the end marker's ".CRLF" is not counted once found
        self._line_length = 0  # octets of the current line so far, CRLF not included
        self._after_cr = False  # the previous octet was a CR not yet known to start a CRLF
        self._starts_with_dot = False

    def feed(self, data: bytes) -> int:
        """Scan ``data``; return the index just past the end marker, or -1 if it is not in it."""
        position = 0
        length = len(data)
        # The next LF and the next NUL at or after ``position``, kept between stops: searching the
        # rest of the chunk again at every CR (or NUL) would be quadratic on a run of them.
        next_newline = -1
        next_nul = -1
        while position < length:
            if self._after_cr:
                self._after_cr = False
                if data[position] == 10:
                    position += 1
                    if self._line_length == 1 and self._starts_with_dot:
                        self.size += position - 3
                        if self.size > self.max_size:
                            self._violate(VIOLATION_TOO_BIG)
                        return position
                    self._line_length = 0
                    self._starts_with_dot = False
                    continue
                self._violate(VIOLATION_BARE_CR)
                self._grow_line(1)
            if next_newline < position:
                next_newline = data.find(b"\n", position)
                if next_newline < 0:
                    next_newline = length
            if next_nul < position:
                next_nul = data.find(b"\x00", position)
                if next_nul < 0:
                    next_nul = length
            bound = next_newline if next_newline < next_nul else next_nul
            carriage = data.find(b"\r", position, bound)
            stop = carriage if carriage >= 0 else bound
            if stop > position:
                if self._line_length == 0 and data[position] == 46:
                    self._starts_with_dot = True
                self._grow_line(stop - position)
            position = stop
            if stop == length:
                break
            position += 1
            octet = data[stop]
            if octet == 13:
                self._after_cr = True
            else:
                # A bare LF ends no line: the "." after it must not start an end marker. A NUL
                # counts in the line as any other octet, so "\x00." is no end marker either.
                self._violate(VIOLATION_BARE_LF if octet == 10 else VIOLATION_NUL)
                self._grow_line(1)
        self.size += length
        if self.size > self.max_size + 3:
            self._violate(VIOLATION_TOO_BIG)
        return -1

    def _grow_line(self, octets: int) -> None:
        self._line_length += octets
        if self._line_length + 2 > self.max_line_length:
            self._violate(VIOLATION_LINE_TOO_LONG)

    def _violate(self, violation: int) -> None:
        # The size is checked once per chunk, line-level faults at their octet: so that the
        # reason does not depend on how TCP cut the body, too-big yields to a later line fault.
        if self.violation == VIOLATION_NONE or (
            self.violation == VIOLATION_TOO_BIG and violation != VIOLATION_TOO_BIG
        ):
            self.violation = violation

