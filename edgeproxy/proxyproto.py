"""PROXY protocol header reader, versions 1 (text) and 2 (binary), sans-IO.

The specification is HAProxy's "The PROXY protocol, Versions 1 & 2" (doc/proxy-protocol.txt,
revision 2020/03/05):

* §2 — the receiver must not process the connection before a complete, valid header, and must
  not guess whether one is present: anything that is not a header is refused.
* §2.1 — version 1: one US-ASCII line ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or
  ``PROXY UNKNOWN[ anything]\\r\\n``, at most 107 bytes including the CRLF, single spaces, no
  heading zeroes in ports or IPv4 octets, no lone CR or LF as a terminator; the connection is
  aborted "as soon as possible" on a mismatch.
* §2.2 — version 2: 12-byte signature, version/command byte, family/transport byte, 16-bit
  big-endian length of what follows (address block, then TLVs, §2.2 "Type-Length-Value").

The reader only parses: whether a header is accepted at all (only from configured balancer
addresses) is the caller's decision. It is fed bytes as they arrive and holds at most
``max_size`` bytes of one header; the bytes after the header are handed back in ``rest``.

Deliberate choices where the spec leaves room:

* v2 PROXY with a family other than UNSPEC (0x00), TCP/IPv4 (0x11) or TCP/IPv6 (0x21) is refused,
  although §2.2 lets a receiver fall back to UNSPEC for UDP and UNIX: that fallback would credit
  the connection to the balancer's own address, which the allow lists trust, so a balancer
  misconfigured for UDP or UNIX forwarding must be noticed rather than silently trusted.
* v2 TLVs are skipped (their framing is checked); a PP2_TYPE_CRC32C checksum is not verified,
  which §2.2.3 permits a receiver that does not support it.
* IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are reported as IPv4 text, because the allow
  lists are written in IPv4 and a dual-stack balancer may present IPv4 clients that way.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PROXY_HEADER_MAX",
    "V1_LINE_MAX",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
]

V1_LINE_MAX = 107
"""§2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses)."""

PROXY_HEADER_MAX = 1024
"""Default cap on the bytes held for one header. §2 designs headers to fit in 536 bytes (the
smallest TCP segment); 1024 leaves room for the TLVs balancers add (SSL details, unique IDs,
cloud-provider endpoint IDs) while bounding the memory an unfinished header can pin. A v2 header
declaring more is refused as soon as its 16 fixed bytes are seen; v1 lines are capped at 107."""

_V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, length
_DETECT_MAX = max(len(_V1_PREFIX), len(V2_SIGNATURE))

# The v1 protocol word including what must follow it, so that a wrong word is refused as soon as
# the differing byte arrives rather than at the CRLF.
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_TCP_CHARS = frozenset(b"0123456789abcdefABCDEF.: \r")

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_ADDRESS_BLOCK = {_V2_TCP4: 12, _V2_TCP6: 36}
_V2_TCP4_ADDRESSES = struct.Struct("!4s4sHH")
_V2_TCP6_ADDRESSES = struct.Struct("!16s16sHH")
_V2_TLV_HEAD = struct.Struct("!BH")


class ProxyHeaderError(ValueError):
    """A malformed, truncated-by-limit, oversized or unsupported header.

    ``str(error)`` is a short reason fit for a log line; it never quotes the client's bytes
    (a sender could otherwise inject text into the log), at most their position or a hex value.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    ``local`` is true for v2 LOCAL, v2 PROXY with the UNSPEC family and v1 ``PROXY UNKNOWN``: the
    balancer speaks for itself (health checks), so the connection's own addresses apply, and
    ``source``/``destination`` are None. Otherwise they are ``(address text, port)`` with the text
    as :mod:`ipaddress` writes it.
    """

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyHeaderReader:
    """Reads one PROXY header from the first bytes of a connection.

    Feed it the bytes as they arrive; ``feed`` returns None while more are needed, the
    :class:`ProxyHeader` once complete (with the bytes that followed it in ``rest``), or raises
    :class:`ProxyHeaderError` as soon as the bytes seen cannot begin a valid header. A failed
    reader raises the same error again if fed; feeding a reader that has returned its header is
    a programming error and raises :class:`RuntimeError`.
    """

    def __init__(self, max_size: int = PROXY_HEADER_MAX) -> None:
        # Below this a spec-conforming v1 line could be refused, and it also covers a v2 TCP/IPv6
        # header (16 + 36 bytes).
        if max_size < V1_LINE_MAX:
            raise ValueError(f"max_size must be at least {V1_LINE_MAX}, got {max_size}")
        self.max_size = max_size
        self.rest = b""
        self._buffer = bytearray()
        self._version = 0  # 0 until the prefix says which version
        self._v2_total = 0  # 16 + declared length, once the fixed part is in
        self._header: ProxyHeader | None = None
        self._error: ProxyHeaderError | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take the next bytes read from the connection (any split, including empty)."""
        if self._header is not None:
            raise RuntimeError("feed() after the PROXY header was complete; the rest is in .rest")
        if self._error is not None:
            raise self._error
        try:
            header = self._feed(data)
        except ProxyHeaderError as error:
            self._error = error
            self._buffer = bytearray()
            raise
        if header is not None:
            self._header = header
            self._buffer = bytearray()
        return header

    def _feed(self, data: bytes) -> ProxyHeader | None:
        if not self._version:
            data = self._detect(data)
            if not self._version:
                return None
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    # -- detection -------------------------------------------------------------------------

    def _detect(self, data: bytes) -> bytes:
        """Buffer at most the longest prefix; settle the version or refuse at the first bad byte."""
        take = data[: _DETECT_MAX - len(self._buffer)]
        self._buffer += take
        seen = bytes(self._buffer)
        if _V1_PREFIX.startswith(seen[: len(_V1_PREFIX)]):
            if len(seen) >= len(_V1_PREFIX):
                self._version = 1
        elif V2_SIGNATURE.startswith(seen):
            if len(seen) == len(V2_SIGNATURE):
                self._version = 2
        else:
            raise ProxyHeaderError(f"not a PROXY protocol header (byte {_first_mismatch(seen)})")
        return data[len(take) :]

    # -- version 1 (§2.1) ------------------------------------------------------------------

    def _feed_v1(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        # One byte beyond the limit is enough to know the line did not end in time.
        take = data[: V1_LINE_MAX + 1 - len(buffer)]
        buffer += take
        newline = buffer.find(b"\n")
        if newline < 0:
            if len(buffer) > V1_LINE_MAX:
                raise ProxyHeaderError(f"v1 header without CRLF in the first {V1_LINE_MAX} bytes")
            _check_v1_partial(buffer)
            return None
        if newline == 0 or buffer[newline - 1] != ord("\r"):
            raise ProxyHeaderError("v1 header line ended by a bare LF")
        if newline + 1 > V1_LINE_MAX:
            raise ProxyHeaderError(f"v1 header line longer than {V1_LINE_MAX} bytes")
        header = _parse_v1(bytes(buffer[: newline - 1]))
        self.rest = bytes(buffer[newline + 1 :]) + bytes(data[len(take) :])
        return header

    # -- version 2 (§2.2) ------------------------------------------------------------------

    def _feed_v2(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        if len(buffer) < _V2_FIXED:
            take = data[: _V2_FIXED - len(buffer)]
            buffer += take
            data = data[len(take) :]
            # Check each fixed byte as it arrives: a bad version or family is refused at once.
            self._check_v2_fixed()
            if len(buffer) < _V2_FIXED:
                return None
        take = data[: self._v2_total - len(buffer)]
        buffer += take
        if len(buffer) < self._v2_total:
            return None
        header = _parse_v2(bytes(buffer))
        self.rest = bytes(data[len(take) :])
        return header

    def _check_v2_fixed(self) -> None:
        buffer = self._buffer
        if len(buffer) > 12:
            version, command = buffer[12] >> 4, buffer[12] & 0x0F
            if version != 2:
                raise ProxyHeaderError(f"unsupported v2 header version {version}")
            if command not in (_V2_LOCAL, _V2_PROXY):
                raise ProxyHeaderError(f"unknown v2 command {command}")
        if len(buffer) > 13:
            family = buffer[13]
            # LOCAL ignores the family (§2.2: "discard the protocol block including the family").
            if buffer[12] & 0x0F == _V2_PROXY and family not in (_V2_UNSPEC, _V2_TCP4, _V2_TCP6):
                raise ProxyHeaderError(f"unsupported family 0x{family:02x} in v2 header")
        if len(buffer) >= _V2_FIXED:
            (length,) = struct.unpack_from("!H", buffer, 14)
            if _V2_FIXED + length > self.max_size:
                raise ProxyHeaderError(f"v2 header declares {length} bytes, over the limit of {self.max_size}")
            if buffer[12] & 0x0F == _V2_PROXY:
                needed = _V2_ADDRESS_BLOCK.get(buffer[13], 0)
                if length < needed:
                    raise ProxyHeaderError(
                        f"v2 header declares {length} bytes, short of the {needed}-byte address block"
                    )
            self._v2_total = _V2_FIXED + length


def _first_mismatch(seen: bytes) -> int:
    """Index of the first byte that fits neither signature (the error text gives no bytes)."""
    expected = _V1_PREFIX if seen[:1] == _V1_PREFIX[:1] else V2_SIGNATURE
    for index, (got, want) in enumerate(zip(seen, expected, strict=False)):
        if got != want:
            return index
    return min(len(seen), len(expected))


def _check_v1_partial(buffer: bytearray) -> None:
    """Refuse an unfinished v1 line as soon as what it holds cannot become a valid header."""
    word = bytes(buffer[len(_V1_PREFIX) :])
    if not any(protocol[: len(word)] == word[: len(protocol)] for protocol in _V1_PROTOCOLS):
        raise ProxyHeaderError("v1 header names an unknown protocol")
    if word.startswith((b"TCP4 ", b"TCP6 ")):
        fields = word[5:]
        if not set(fields) <= _V1_TCP_CHARS:
            raise ProxyHeaderError("v1 header holds a character not allowed in addresses or ports")
        carriage_return = fields.find(b"\r")
        if 0 <= carriage_return < len(fields) - 1:
            raise ProxyHeaderError("v1 header line has a CR not followed by LF")


def _parse_v1(line: bytes) -> ProxyHeader:
    """Parse a whole v1 line, CRLF removed."""
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(version=1, local=True, source=None, destination=None)
    fields = line.split(b" ")
    if len(fields) != 6 or fields[0] != b"PROXY":
        raise ProxyHeaderError("v1 header is not six fields separated by single spaces")
    _, protocol, source, destination, source_port, destination_port = fields
    if protocol == b"TCP4":
        parse_address = _parse_v1_ipv4
    elif protocol == b"TCP6":
        parse_address = _parse_v1_ipv6
    else:
        raise ProxyHeaderError("v1 header names an unknown protocol")
    return ProxyHeader(
        version=1,
        local=False,
        source=(parse_address(source, "source"), _parse_v1_port(source_port, "source")),
        destination=(parse_address(destination, "destination"), _parse_v1_port(destination_port, "destination")),
    )


def _parse_v1_ipv4(text: bytes, role: str) -> str:
    try:
        # ipaddress refuses heading zeroes in octets, as §2.1 requires.
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    except ValueError:  # UnicodeDecodeError and AddressValueError alike
        raise ProxyHeaderError(f"v1 TCP4 header has a malformed {role} address") from None


def _parse_v1_ipv6(text: bytes, role: str) -> str:
    # ipaddress accepts a "%scope" suffix, which has no meaning on the far side of a balancer.
    if b"%" in text:
        raise ProxyHeaderError(f"v1 TCP6 header has a malformed {role} address")
    try:
        address = ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"v1 TCP6 header has a malformed {role} address") from None
    return _address_text(address)


def _parse_v1_port(text: bytes, role: str) -> int:
    # int() alone would take signs, spaces, underscores and non-ASCII digits; §2.1 also bans
    # heading zeroes.
    if not (text.isdigit() and 0 < len(text) <= 5) or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyHeaderError(f"v1 header has a malformed {role} port")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"v1 header has a {role} port out of range")
    return port


def _parse_v2(header: bytes) -> ProxyHeader:
    """Parse a whole v2 header whose fixed part was already checked."""
    command, family = header[12] & 0x0F, header[13]
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        # §2.2: LOCAL, and PROXY over UNSPEC, carry no addresses the receiver should use.
        return ProxyHeader(version=2, local=True, source=None, destination=None)
    block = header[_V2_FIXED:]
    to_address: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if family == _V2_TCP4:
        layout, to_address = _V2_TCP4_ADDRESSES, ipaddress.IPv4Address
    else:
        layout, to_address = _V2_TCP6_ADDRESSES, ipaddress.IPv6Address
    source, destination, source_port, destination_port = layout.unpack_from(block)
    _check_tlvs(block[layout.size :])
    return ProxyHeader(
        version=2,
        local=False,
        source=(_address_text(to_address(source)), source_port),
        destination=(_address_text(to_address(destination)), destination_port),
    )


def _check_tlvs(tlvs: bytes) -> None:
    """Walk the TLVs (§2.2) only to check that each fits inside the declared length."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _V2_TLV_HEAD.size:
            raise ProxyHeaderError("v2 header ends inside a TLV's type and length")
        _, length = _V2_TLV_HEAD.unpack_from(tlvs, offset)
        offset += _V2_TLV_HEAD.size + length
        if offset > len(tlvs):
            raise ProxyHeaderError("v2 header has a TLV running past its declared length")


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
