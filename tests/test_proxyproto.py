"""PROXY protocol header reader (edgeproxy.proxyproto): every valid v1/v2 form, each malformed form
refused as early as the spec allows, arbitrary splitting of the input, and fuzzing. The v2 headers
are built here with struct, from the layout in HAProxy's proxy-protocol.txt §2.2."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.proxyproto import (
    PROXY_HEADER_MAX,
    V1_LINE_MAX,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x0, 0x1
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32
SMTP = b"EHLO client.example\r\n"
# The first bytes of a TLS 1.2 ClientHello record (handshake, TLS 1.0 record version, length).
TLS_CLIENT_HELLO = bytes.fromhex("160301020001 0001fc0303") + bytes(32)


# -- helpers -------------------------------------------------------------------------------


def v2(command: int, family: int, block: bytes = b"", *, length: int | None = None, version: int = 2) -> bytes:
    """A v2 header; ``length`` overrides the declared length (to lie about the block)."""
    declared = len(block) if length is None else length
    return SIGNATURE + struct.pack("!BBH", version << 4 | command, family, declared) + block


def v2_tcp4(source: str, source_port: int, destination: str, destination_port: int, tlvs: bytes = b"") -> bytes:
    block = struct.pack(
        "!4s4sHH",
        ipaddress.IPv4Address(source).packed,
        ipaddress.IPv4Address(destination).packed,
        source_port,
        destination_port,
    )
    return v2(PROXY, TCP4, block + tlvs)


def v2_tcp6(source: str, source_port: int, destination: str, destination_port: int, tlvs: bytes = b"") -> bytes:
    block = struct.pack(
        "!16s16sHH",
        ipaddress.IPv6Address(source).packed,
        ipaddress.IPv6Address(destination).packed,
        source_port,
        destination_port,
    )
    return v2(PROXY, TCP6, block + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def feed_chunks(chunks: Iterable[bytes], max_size: int = PROXY_HEADER_MAX) -> tuple[ProxyHeader | None, bytes]:
    """Feed until a header comes out; the header (or None) and the reader's rest."""
    reader = ProxyHeaderReader(max_size)
    for chunk in chunks:
        header = reader.feed(chunk)
        if header is not None:
            return header, reader.rest
    return None, reader.rest


def parse(data: bytes, max_size: int = PROXY_HEADER_MAX) -> ProxyHeader | None:
    return feed_chunks([data], max_size)[0]


def refused_at(data: bytes, max_size: int = PROXY_HEADER_MAX) -> int | None:
    """Fed one byte at a time: the index of the byte that made the reader refuse, or None."""
    reader = ProxyHeaderReader(max_size)
    for index in range(len(data)):
        try:
            if reader.feed(data[index : index + 1]) is not None:
                return None
        except ProxyHeaderError:
            return index
    return None


def refuse(data: bytes, match: str | None = None, max_size: int = PROXY_HEADER_MAX) -> ProxyHeaderError:
    """Assert the header is refused whole and byte by byte; the error from the whole feed."""
    with pytest.raises(ProxyHeaderError, match=match) as caught:
        parse(data, max_size)
    assert refused_at(data, max_size) is not None
    return caught.value


def tcp(version: int, source: tuple[str, int], destination: tuple[str, int]) -> ProxyHeader:
    return ProxyHeader(version=version, local=False, source=source, destination=destination)


def local(version: int) -> ProxyHeader:
    return ProxyHeader(version=version, local=True, source=None, destination=None)


IPV6_MAX = ":".join(["ffff"] * 8)
V1_TCP4 = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::10 2001:db8::1 56324 587\r\n"
V1_TCP6_LONGEST = f"PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode()
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_LONGEST = f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode()
V2_TCP4 = v2_tcp4("192.0.2.10", 56324, "198.51.100.1", 25)
V2_TCP6 = v2_tcp6("2001:db8::10", 56324, "2001:db8::1", 587)
V2_TCP6_TLVS = v2_tcp6(
    "2001:db8::10", 1, "2001:db8::1", 2, tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0x20, b"\x01" + bytes(4))
)
V2_LOCAL = v2(LOCAL, UNSPEC)

VALID = [
    pytest.param(V1_TCP4, tcp(1, ("192.0.2.10", 56324), ("198.51.100.1", 25)), id="v1-tcp4"),
    pytest.param(V1_TCP6, tcp(1, ("2001:db8::10", 56324), ("2001:db8::1", 587)), id="v1-tcp6"),
    pytest.param(
        V1_TCP6_LONGEST, tcp(1, ("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535)), id="v1-tcp6-longest"
    ),
    pytest.param(V1_UNKNOWN, local(1), id="v1-unknown"),
    pytest.param(V1_UNKNOWN_LONGEST, local(1), id="v1-unknown-longest"),
    pytest.param(V2_TCP4, tcp(2, ("192.0.2.10", 56324), ("198.51.100.1", 25)), id="v2-tcp4"),
    pytest.param(V2_TCP6, tcp(2, ("2001:db8::10", 56324), ("2001:db8::1", 587)), id="v2-tcp6"),
    pytest.param(V2_TCP6_TLVS, tcp(2, ("2001:db8::10", 1), ("2001:db8::1", 2)), id="v2-tcp6-tlvs"),
    pytest.param(V2_LOCAL, local(2), id="v2-local"),
    pytest.param(v2(PROXY, UNSPEC), local(2), id="v2-proxy-unspec"),
]


# -- valid forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_whole(data: bytes, expected: ProxyHeader) -> None:
    assert feed_chunks([data]) == (expected, b"")


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_split_at_every_byte_boundary(data: bytes, expected: ProxyHeader) -> None:
    stream = data + SMTP
    for cut in range(len(stream) + 1):
        got, rest = feed_chunks([stream[:cut], stream[cut:]])
        assert got == expected, cut
        # rest holds what followed the header in the chunk that completed it.
        assert rest == (SMTP if cut < len(data) else stream[len(data) : cut]), cut


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    reader = ProxyHeaderReader()
    for byte in data[:-1]:
        assert reader.feed(bytes([byte])) is None
        assert reader.rest == b""
    assert reader.feed(data[-1:] + SMTP) == expected
    assert reader.rest == SMTP


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid_header_split_three_ways(data: bytes, expected: ProxyHeader) -> None:
    stream = data + SMTP
    for first in range(len(data)):
        for second in range(first, len(data)):
            got, rest = feed_chunks([stream[:first], stream[first:second], stream[second:]])
            assert (got, rest) == (expected, SMTP), (first, second)


def test_rest_carries_the_clients_first_bytes_after_a_split_header() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(V2_TCP4[:7]) is None
    assert reader.feed(V2_TCP4[7:20]) is None
    assert reader.feed(V2_TCP4[20:] + b"EHLO a\r\nMAIL FROM:<>\r\n") is not None
    assert reader.rest == b"EHLO a\r\nMAIL FROM:<>\r\n"


def test_rest_is_not_limited_by_max_size() -> None:
    # Pipelined SMTP after the header is the client's, not part of the header.
    following = b"NOOP\r\n" * 2000
    assert feed_chunks([V1_TCP4 + following]) == (parse(V1_TCP4), following)
    assert feed_chunks([V2_TCP6 + following]) == (parse(V2_TCP6), following)


def test_rest_is_empty_before_completion_and_when_nothing_follows() -> None:
    reader = ProxyHeaderReader()
    assert reader.rest == b""
    assert reader.feed(V1_TCP4[:-1]) is None
    assert reader.rest == b""
    assert reader.feed(V1_TCP4[-1:]) is not None
    assert reader.rest == b""


def test_empty_feeds_need_more() -> None:
    reader = ProxyHeaderReader()
    for chunk in (b"", V2_TCP4[:12], b"", V2_TCP4[12:16], b"", V2_TCP4[16:]):
        header = reader.feed(chunk)
    assert header == parse(V2_TCP4)


def test_v1_tcp6_address_is_canonicalised() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:10 2001:0db8::0001 1 2\r\n")
    assert header == tcp(1, ("2001:db8::10", 1), ("2001:db8::1", 2))


def test_v1_ports_zero_and_maximum() -> None:
    assert parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 0 65535\r\n") == tcp(1, ("192.0.2.1", 0), ("192.0.2.2", 65535))


def test_v1_unknown_ignores_anything_before_crlf() -> None:
    # §2.1: "the receiver must ignore anything presented before the CRLF".
    assert parse(b"PROXY UNKNOWN whatever \xff\x00 goes\rhere\r\n") == local(1)
    assert parse(b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n") == local(1)


def test_v1_longest_lines_are_within_the_spec_limit() -> None:
    assert len(V1_TCP6_LONGEST) == 104
    assert len(V1_UNKNOWN_LONGEST) == V1_LINE_MAX == 107


def test_v2_ipv4_mapped_source_reported_as_ipv4() -> None:
    header = parse(v2_tcp6("::ffff:192.0.2.77", 4000, "::ffff:198.51.100.1", 25))
    assert header == tcp(2, ("192.0.2.77", 4000), ("198.51.100.1", 25))


def test_v1_ipv4_mapped_source_reported_as_ipv4() -> None:
    header = parse(b"PROXY TCP6 ::ffff:192.0.2.77 ::FFFF:c633:6401 4000 25\r\n")
    assert header == tcp(1, ("192.0.2.77", 4000), ("198.51.100.1", 25))


def test_v2_plain_ipv6_not_mistaken_for_mapped() -> None:
    # ::192.0.2.77 is the deprecated IPv4-compatible form, not ::ffff:, so it stays IPv6.
    assert parse(v2_tcp6("::c000:24d", 1, "::1", 2)) == tcp(2, ("::c000:24d", 1), ("::1", 2))


def test_v2_local_is_local_whatever_its_family_and_block() -> None:
    # §2.2: LOCAL must be accepted and its block, family included, discarded.
    assert parse(v2(LOCAL, UNIX_STREAM, bytes(216))) == local(2)
    assert parse(v2(LOCAL, 0x77, b"junk")) == local(2)
    assert parse(v2(LOCAL, TCP4, b"")) == local(2)  # shorter than a TCP4 block: ignored anyway


def test_v2_proxy_unspec_is_local_and_its_block_skipped() -> None:
    assert feed_chunks([v2(PROXY, UNSPEC, b"\x01\x02\x03") + SMTP]) == (local(2), SMTP)


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x05, bytes(128)) + tlv(0xEA, b"\x01vpce-0123456789abcdef0") + tlv(0x04, b"")
    assert feed_chunks([v2_tcp4("192.0.2.1", 1, "192.0.2.2", 2, tlvs) + SMTP]) == (
        tcp(2, ("192.0.2.1", 1), ("192.0.2.2", 2)),
        SMTP,
    )


def test_v2_declared_length_at_the_limit_is_accepted() -> None:
    padding = tlv(0x04, bytes(PROXY_HEADER_MAX - 16 - 12 - 3))
    header = v2_tcp4("192.0.2.1", 1, "192.0.2.2", 2, padding)
    assert len(header) == PROXY_HEADER_MAX
    assert parse(header) == tcp(2, ("192.0.2.1", 1), ("192.0.2.2", 2))


def test_custom_max_size_applies_to_v2() -> None:
    header = v2_tcp4("192.0.2.1", 1, "192.0.2.2", 2, tlv(0x04, bytes(200)))
    assert parse(header, max_size=len(header)) is not None
    refuse(header, "over the limit", max_size=len(header) - 1)


def test_max_size_below_a_v1_line_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="at least 107"):
        ProxyHeaderReader(max_size=106)


def test_header_is_immutable() -> None:
    header = parse(V1_TCP4)
    with pytest.raises(AttributeError):
        header.local = True  # type: ignore[misc, union-attr]


# -- state after the header or an error --------------------------------------------------------


def test_feeding_after_completion_is_a_programming_error() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(V1_TCP4 + SMTP) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"more")
    assert reader.rest == SMTP


def test_feeding_after_an_error_raises_it_again() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError) as first:
        reader.feed(b"EHLO")
    with pytest.raises(ProxyHeaderError) as second:
        reader.feed(V1_TCP4)
    assert second.value is first.value


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyHeaderError, ValueError)


def test_error_text_does_not_quote_client_bytes() -> None:
    evil = b"PROXY TCP4 \x1b[31mevil\r\n"
    message = str(refuse(evil))
    assert "evil" not in message and "\x1b" not in message
    message = str(refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2evil\r\n"))
    assert "evil" not in message


# -- detection ---------------------------------------------------------------------------------


def test_plain_smtp_refused_at_the_first_byte() -> None:
    assert refused_at(SMTP) == 0
    refuse(SMTP, "not a PROXY protocol header")


def test_tls_client_hello_refused_at_the_first_byte() -> None:
    assert refused_at(TLS_CLIENT_HELLO) == 0
    refuse(TLS_CLIENT_HELLO, "not a PROXY protocol header")


def test_lowercase_proxy_refused_at_the_first_byte() -> None:
    assert refused_at(b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n") == 0


def test_v1_prefix_diverging_late_refused_at_that_byte() -> None:
    assert refused_at(b"PROXX TCP4") == 4
    assert refused_at(b"PROXYTCP4 ") == 5  # the space is part of the prefix


def test_v2_signature_diverging_late_refused_at_that_byte() -> None:
    assert refused_at(SIGNATURE[:11] + b"X" + bytes(8)) == 11
    assert refused_at(SIGNATURE[:4] + b"\x01") == 4


def test_error_for_the_whole_buffer_does_not_wait_for_more() -> None:
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderReader().feed(b"E")
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderReader().feed(b"\r\n\r\n\x01")


# -- malformed v1 ------------------------------------------------------------------------------


def test_v1_without_crlf_refused_at_byte_108() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 200
    reader = ProxyHeaderReader()
    assert reader.feed(line[:V1_LINE_MAX]) is None
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        reader.feed(line[V1_LINE_MAX : V1_LINE_MAX + 1])
    assert refused_at(line) == V1_LINE_MAX  # index 107: the 108th byte


def test_v1_without_crlf_refused_in_one_large_chunk() -> None:
    refuse(b"PROXY UNKNOWN " + b"x" * 100_000, "without CRLF")


def test_v1_line_of_108_bytes_refused() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n"
    assert len(line) == 108
    refuse(line)
    assert refused_at(line) == 107


def test_v1_bare_lf_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "bare LF")
    refuse(b"PROXY UNKNOWN\n", "bare LF")


def test_v1_bare_cr_refused() -> None:
    data = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rEHLO\r\n"
    refuse(data)
    assert refused_at(data) == data.index(b"\r") + 1


def test_v1_unknown_protocol_refused_at_the_differing_byte() -> None:
    assert refused_at(b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n") == 9
    assert refused_at(b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n") == 7  # "U" could begin UNKNOWN
    refuse(b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "unknown protocol")


def test_v1_unknown_glued_to_more_letters_refused() -> None:
    assert refused_at(b"PROXY UNKNOWNX\r\n") == 13
    refuse(b"PROXY UNKNOWNX\r\n")


def test_v1_protocol_missing_refused() -> None:
    refuse(b"PROXY \r\n")
    refuse(b"PROXY TCP4\r\n")


def test_v1_double_space_refused() -> None:
    assert refused_at(b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n") == 6
    refuse(b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "single spaces")


def test_v1_trailing_space_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "single spaces")


def test_v1_too_few_fields_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "single spaces")


def test_v1_too_many_fields_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", "single spaces")


def test_v1_tab_separator_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n")


def test_v1_tcp4_with_ipv6_address_refused() -> None:
    refuse(b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "malformed source address")
    refuse(b"PROXY TCP4 192.0.2.1 ::1 1 2\r\n", "malformed destination address")


def test_v1_tcp6_with_ipv4_address_refused() -> None:
    refuse(b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n", "malformed source address")
    refuse(b"PROXY TCP6 2001:db8::1 192.0.2.1 1 2\r\n", "malformed destination address")


def test_v1_ipv4_octet_out_of_range_refused() -> None:
    refuse(b"PROXY TCP4 256.0.2.1 192.0.2.2 1 2\r\n", "malformed source address")


def test_v1_ipv4_heading_zero_refused() -> None:
    # §2.1: heading zeroes would be ambiguous with octal.
    refuse(b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "malformed source address")


def test_v1_ipv4_short_form_refused() -> None:
    refuse(b"PROXY TCP4 192.2 192.0.2.2 1 2\r\n", "malformed source address")


def test_v1_ipv6_scope_refused() -> None:
    refuse(b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n", "malformed source address")


def test_v1_ipv6_too_many_groups_refused() -> None:
    refuse(f"PROXY TCP6 {IPV6_MAX}:1 ::1 1 2\r\n".encode(), "malformed source address")


def test_v1_non_ascii_address_refused() -> None:
    refuse("PROXY TCP4 192.0.2.١ 192.0.2.2 1 2\r\n".encode(), "not allowed|malformed")


def test_v1_port_with_minus_sign_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n")
    with pytest.raises(ProxyHeaderError, match="malformed source port"):
        parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n")


def test_v1_port_with_plus_sign_refused() -> None:
    with pytest.raises(ProxyHeaderError, match="malformed destination port"):
        parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 +2\r\n")
    assert refused_at(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 +2\r\n") is not None


def test_v1_empty_port_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2  2\r\n")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \r\n")


def test_v1_non_digit_port_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1a 2\r\n", "malformed source port")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 0x19 2\r\n")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1_0 2\r\n")
    refuse("PROXY TCP4 192.0.2.1 192.0.2.2 ٢٥ 2\r\n".encode())


def test_v1_port_above_65535_refused() -> None:
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", "source port out of range")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\n", "destination port out of range")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000000 2\r\n", "malformed source port")


def test_v1_port_heading_zero_refused() -> None:
    # §2.1 forbids heading zeroes in ports too; a lone "0" is the number zero.
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 025 2\r\n", "malformed source port")
    refuse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 00\r\n", "malformed destination port")


# -- malformed v2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3, 0xF])
def test_v2_wrong_version_nibble_refused_at_byte_12(version: int) -> None:
    data = v2(PROXY, TCP4, bytes(12), version=version)
    assert refused_at(data) == 12
    refuse(data, f"version {version}")


@pytest.mark.parametrize("command", [2, 3, 0xF])
def test_v2_unknown_command_refused_at_byte_12(command: int) -> None:
    data = v2(command, TCP4, bytes(12))
    assert refused_at(data) == 12
    refuse(data, f"unknown v2 command {command}")


def test_v2_udp4_refused() -> None:
    assert refused_at(v2(PROXY, UDP4, bytes(12))) == 13
    refuse(v2(PROXY, UDP4, bytes(12)), "unsupported family 0x12")


def test_v2_udp6_refused() -> None:
    refuse(v2(PROXY, UDP6, bytes(36)), "unsupported family 0x22")


def test_v2_unix_stream_refused() -> None:
    refuse(v2(PROXY, UNIX_STREAM, bytes(216)), "unsupported family 0x31")


def test_v2_unix_dgram_refused() -> None:
    refuse(v2(PROXY, UNIX_DGRAM, bytes(216)), "unsupported family 0x32")


@pytest.mark.parametrize("family", [0x01, 0x10, 0x13, 0x20, 0x41, 0xFF])
def test_v2_unknown_family_refused(family: int) -> None:
    data = v2(PROXY, family, bytes(36))
    assert refused_at(data) == 13
    refuse(data, f"unsupported family 0x{family:02x}")


def test_v2_tcp4_length_shorter_than_address_block_refused_at_byte_15() -> None:
    data = v2(PROXY, TCP4, bytes(11))
    assert refused_at(data) == 15
    refuse(data, "short of the 12-byte address block")


def test_v2_tcp6_length_shorter_than_address_block_refused_at_byte_15() -> None:
    data = v2(PROXY, TCP6, bytes(12))  # a TCP4-sized block under the TCP6 family
    assert refused_at(data) == 15
    refuse(data, "short of the 36-byte address block")


def test_v2_oversized_declared_length_refused_before_the_body() -> None:
    fixed = v2(PROXY, TCP4, length=PROXY_HEADER_MAX - 16 + 1)
    assert len(fixed) == 16
    reader = ProxyHeaderReader()
    assert reader.feed(fixed[:15]) is None
    with pytest.raises(ProxyHeaderError, match="over the limit"):
        reader.feed(fixed[15:])


def test_v2_maximum_declared_length_refused_before_the_body() -> None:
    with pytest.raises(ProxyHeaderError, match="65535 bytes, over the limit of 1024"):
        parse(v2(PROXY, TCP6, length=0xFFFF))


def test_v2_local_oversized_declared_length_refused() -> None:
    with pytest.raises(ProxyHeaderError, match="over the limit"):
        parse(v2(LOCAL, UNSPEC, length=PROXY_HEADER_MAX))


def test_v2_tlv_running_past_the_end_refused() -> None:
    block = v2_tcp4("192.0.2.1", 1, "192.0.2.2", 2)[16:]
    refuse(v2(PROXY, TCP4, block + struct.pack("!BH", 0x01, 10) + b"short"), "TLV running past")


def test_v2_truncated_tlv_head_refused() -> None:
    block = v2_tcp4("192.0.2.1", 1, "192.0.2.2", 2)[16:]
    refuse(v2(PROXY, TCP4, block + b"\x01\x00"), "inside a TLV")


def test_v2_truncated_header_needs_more_not_a_guess() -> None:
    # A header cut short is only ever "need more": the caller's timeout ends it.
    for cut in range(len(V2_TCP6)):
        assert feed_chunks([V2_TCP6[:cut]]) == (None, b"")


# -- fuzzing -----------------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 ",
    SIGNATURE,
    SIGNATURE + b"\x21\x11",
    SIGNATURE + b"\x21\x21",
    SIGNATURE + b"\x20",
    SIGNATURE + b"\x21\x11\x00\x0c",
    SIGNATURE + b"\x20\x00\x00\x00",
    b"PROXY UNKNOWN\r\n",
]


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@settings(max_examples=300)
@given(st.data())
def test_fuzz_arbitrary_bytes_only_ever_yield_a_header_none_or_proxy_header_error(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from(PREFIXES)) + data.draw(st.binary(max_size=300))
    chunks = data.draw(chunked(stream))
    reader = ProxyHeaderReader()
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            header = reader.feed(chunk)
        except ProxyHeaderError as error:
            message = str(error)
            assert message.isascii() and message.isprintable() and 0 < len(message) < 100
            return
        if header is not None:
            assert isinstance(header, ProxyHeader)
            # The header is exactly the bytes not handed back, whichever way they were split.
            length = fed - len(reader.rest)
            assert stream[length:fed] == reader.rest
            assert feed_chunks([stream[:length]]) == (header, b"")
            return


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    version = draw(st.sampled_from([1, 2]))
    family = draw(st.sampled_from([4, 6]))
    source = draw(st.ip_addresses(v=family))
    destination = draw(st.ip_addresses(v=family))
    source_port, destination_port = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))

    def expected_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        mapped = getattr(address, "ipv4_mapped", None)
        return str(mapped if mapped is not None else address)

    expected = tcp(version, (expected_text(source), source_port), (expected_text(destination), destination_port))
    if version == 1:
        # Any spelling ipaddress reads is accepted; the text returned is canonical.
        spell = draw(st.sampled_from([str, lambda a: a.exploded, lambda a: str(a).upper()]))
        line = f"PROXY TCP{family} {spell(source)} {spell(destination)} {source_port} {destination_port}\r\n"
        return line.encode(), expected
    tlvs = b"".join(
        tlv(kind, value)
        for kind, value in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=60)), max_size=6))
    )
    assert 16 + 36 + len(tlvs) <= PROXY_HEADER_MAX  # six TLVs of at most 63 bytes always fit
    build = v2_tcp4 if family == 4 else v2_tcp6
    return build(str(source), source_port, str(destination), destination_port, tlvs), expected


@settings(max_examples=300)
@given(st.data())
def test_fuzz_valid_headers_round_trip_at_any_split(data: st.DataObject) -> None:
    header, expected = data.draw(valid_headers())
    following = data.draw(st.binary(max_size=40))
    stream = header + following
    reader = ProxyHeaderReader()
    chunks = data.draw(chunked(stream))
    got = None
    while got is None:
        got = reader.feed(chunks.pop(0))
    assert got == expected
    # The split may fall anywhere in what follows: rest is the part that came with the header.
    assert reader.rest + b"".join(chunks) == following
