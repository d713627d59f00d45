"""PROXY protocol v1/v2 through the running proxy (design.md §8): behind a load balancer, the
address in the balancer's header is the client for every rule, limit, header and log line; from
anywhere else a PROXY header is an attack and is refused.

The balancer is played by the test: its connections come from 127.0.0.1, listed in
PROXY_PROTOCOL_FROM, and the header names the client the test wants the proxy to see.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from tests.backends import PipeliningSink
from tests.conftest import wait_for
from tests.test_proxy_attacks import Client
from tests.test_proxy_robustness import read_to_end
from tests.test_proxyproto import LOCAL, UNSPEC, v2_tcp4, v2_tcp6
from tests.test_proxyproto import SIGNATURE as V2_SIGNATURE
from tests.test_proxyproto import v2 as v2_header

BALANCER = "127.0.0.1/32"
RELAY_DENIED = POLICY_DEFAULTS["RELAY_DENIED"].encode()


def v1(source: str, port: int = 40000, destination: str = "192.0.2.1") -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {port} 25\r\n".encode()


def v2(source: str | None, port: int = 40000, destination: str = "192.0.2.1", tlvs: bytes = b"") -> bytes:
    """A v2 header; ``source=None`` makes a LOCAL one (a balancer's health check)."""
    if source is None:
        return v2_header(LOCAL, UNSPEC, tlvs)
    return (v2_tcp6 if ":" in source else v2_tcp4)(source, port, destination, 25, tlvs)


class Balancer(Client):
    """A connection from the balancer's address: the header first, then the client's SMTP."""

    def __init__(self, port: int, header: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.sock.sendall(header)
        self.greeting = self.read_reply()



def relay_attempt(client: Client) -> bytes:
    assert client.command(b"EHLO client.test\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
    return client.command(b"RCPT TO:<victim@far-away.test>\r\n")


# -- the header's address is the client -----------------------------------------------------------


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
def test_the_relay_policy_applies_to_the_client_in_the_header_not_to_the_balancer(make_proxy, make_header) -> None:
    """The balancer (127.0.0.1) is in RELAY_ALLOW here: behind a balancer, trusting the socket's
    address would make the proxy an open relay. Only the header's client decides."""
    with PipeliningSink(xclient=True) as backend:
        proxy = make_proxy(backend.address, proxy_protocol_from=BALANCER,
                           relay_allow="127.0.0.1/32,198.51.100.0/24")
        stranger = Balancer(proxy.port, make_header("203.0.113.9"))
        assert stranger.greeting.startswith(b"220 ")
        assert relay_attempt(stranger) == RELAY_DENIED
        stranger.close()

        friend = Balancer(proxy.port, make_header("198.51.100.7"))
        assert relay_attempt(friend).startswith(b"250")
        assert friend.command(b"DATA\r\n").startswith(b"354")
        assert friend.command(b"Subject: via the balancer\r\n\r\nhello\r\n.\r\n").startswith(b"250")
        friend.close()
        assert wait_for(lambda: len(backend.messages) == 1)
        message = backend.messages[0]
        assert message.xclient["ADDR"] == "198.51.100.7"  # the backend learns the real client too
        assert b"198.51.100.7" in message.data.split(b"\r\n\r\n")[0]  # in our Received: header


def test_an_ipv6_client_in_a_v2_header(make_proxy) -> None:
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address, proxy_protocol_from=BALANCER, relay_allow="2001:db8::/32")
        client = Balancer(proxy.port, v2("2001:db8::25", destination="2001:db8::1"))
        assert relay_attempt(client).startswith(b"250")
        client.close()


def test_connect_lists_and_per_client_limits_see_the_header_address(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER, connect_deny="192.0.2.0/24",
                       max_connections_per_ip="1")
    denied = Balancer(proxy.port, v1("192.0.2.66"))
    assert denied.greeting == POLICY_DEFAULTS["CONNECT_DENIED"].encode()
    # One connection per client: two clients behind the one balancer address are two clients...
    first = Balancer(proxy.port, v1("203.0.113.1"))
    second = Balancer(proxy.port, v2("203.0.113.2"))
    assert first.greeting.startswith(b"220 ") and second.greeting.startswith(b"220 ")
    # ... and the same client twice is one client over its limit.
    again = Balancer(proxy.port, v1("203.0.113.1", port=40001))
    assert again.greeting == POLICY_DEFAULTS["TOO_MANY_CONNECTIONS"].encode()
    for client in (denied, first, second, again):
        client.close()


def test_log_lines_name_the_client_and_the_balancer_and_every_refused_header(logged_proxy, sink) -> None:
    """In a real process logging at info: the refusal names the header's client and the balancer
    it came through; a bad header, a missing one and one from an address not listed are each one
    ``refused`` line with their own rule (the suite's in-process logging is at warning)."""
    proxy = logged_proxy(sink.address, proxy_protocol_from=BALANCER, proxy_protocol_timeout="0.5")
    client = Balancer(proxy.port, v2("203.0.113.5"))
    assert relay_attempt(client) == RELAY_DENIED
    client.close()
    bad = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    bad.sendall(b"PROXY TCP4 203.0.113.1 192.0.2.1 40000\r\n")
    assert read_to_end(bad) == b""
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    assert read_to_end(silent) == b""
    untrusted = socket.create_connection(("127.0.0.1", proxy.port), timeout=10, source_address=("127.0.0.2", 0))
    untrusted.sendall(v1("198.51.100.7"))
    assert read_to_end(untrusted).startswith(b"220 ")  # greeted as plain SMTP, then dropped at the header
    for sock in (bad, silent, untrusted):
        sock.close()
    assert wait_for(lambda: len(proxy.refusals()) >= 4, 10), proxy.lines
    refused = proxy.refusals()
    relay = next(line for line in refused if line.get("stage") == "rcpt")
    assert (relay["client"], relay["via"]) == ("203.0.113.5", "127.0.0.1")
    rules = {line["rule"]: line for line in refused if line.get("stage") == "proxy"}
    assert set(rules) == {"proxy_header_invalid", "proxy_header_timeout", "proxy_header_untrusted"}
    assert rules["proxy_header_invalid"]["peer"] == "127.0.0.1"
    assert rules["proxy_header_untrusted"]["client"] == "127.0.0.2"


# -- framing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
def test_a_header_split_into_single_bytes(make_proxy, sink, make_header) -> None:
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    for byte in make_header("203.0.113.7"):
        sock.sendall(bytes([byte]))
        time.sleep(0.001)
    client = Client.__new__(Client)
    client.sock, client.buffer = sock, b""
    assert client.read_reply().startswith(b"220 ")
    assert relay_attempt(client) == RELAY_DENIED
    client.close()


def test_what_follows_the_header_in_the_same_read_is_the_clients_first_command(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(v2("203.0.113.8", tlvs=b"\x04\x00\x02ok") + b"EHLO client.test\r\n")
    client = Client.__new__(Client)
    client.sock, client.buffer = sock, b""
    assert client.read_reply().startswith(b"220 ")
    assert client.read_reply().startswith(b"250-")
    client.close()


def test_a_local_v2_header_gets_the_normal_greeting(make_proxy, sink) -> None:
    """A balancer's own health check: no client to name, the connection's own address stands."""
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER)
    check = Balancer(proxy.port, v2(None))
    assert check.greeting.startswith(b"220 ")
    assert check.command(b"QUIT\r\n").startswith(b"221")
    check.close()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.1 192.0.2.1 40000\r\n",  # a port missing
        b"PROXY TCP4 2001:db8::1 192.0.2.1 40000 25\r\n",  # wrong family
        b"PROXY TCP4 203.0.113.1 192.0.2.1 40000 99999\r\n",  # port out of range
        b"PROXY UDP4 203.0.113.1 192.0.2.1 40000 25\r\n",
        b"PROXY TCP4 " + b"9" * 120 + b"\r\n",  # longer than the 107 octets v1 allows
        V2_SIGNATURE + bytes([0x21, 0x12]) + struct.pack("!H", 12) + bytes(12),  # UDP
        V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216),  # UNIX
        V2_SIGNATURE + bytes([0x31, 0x11]) + struct.pack("!H", 12) + bytes(12),  # version 3
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 4) + bytes(4),  # block too short
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000),  # oversized, refused at once
        b"EHLO client.test\r\n",  # plain SMTP from a balancer address
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
    ids=["v1-short", "v1-family", "v1-port", "v1-udp", "v1-long", "v2-udp", "v2-unix", "v2-version",
         "v2-short-block", "v2-oversized", "smtp", "tls"],
)
def test_a_bad_header_closes_the_connection_without_a_word(make_proxy, sink, header: bytes) -> None:
    """(A good header gets the greeting at once: see the tests above.)"""
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(header)
    started = time.monotonic()
    assert read_to_end(sock) == b"", "nothing is said to a connection whose header is bad"
    assert time.monotonic() - started < 3, "refused at once, not at the header timeout"
    sock.close()


def test_a_balancer_that_sends_no_header_is_cut_off_at_the_timeout(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address, proxy_protocol_from=BALANCER, proxy_protocol_timeout="0.5")
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    started = time.monotonic()
    assert read_to_end(sock) == b""
    assert 0.3 < time.monotonic() - started < 5
    sock.close()


# -- never trusted from anywhere else -----------------------------------------------------------------


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
def test_a_header_from_an_address_not_listed_is_refused(make_proxy, make_header) -> None:
    """127.0.0.1 is not a balancer here: a PROXY header from it is a client claiming to be
    another (one the relay allow list trusts). The connection is dropped, nothing relayed."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address, proxy_protocol_from="127.0.0.2/32", relay_allow="198.51.100.0/24")
        client = Client(proxy.port)  # the greeting: for this address, plain SMTP is expected
        client.sock.sendall(make_header("198.51.100.7") + b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n"
                            b"RCPT TO:<victim@far-away.test>\r\n")
        assert read_to_end(client.sock) == b""
        client.close()
        proxy.wait_quiet()
    assert backend.connections <= 1 and not backend.messages  # (the start-up probe only)


def test_without_proxy_protocol_configured_a_header_is_refused_too(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    client = Client(proxy.port)
    client.sock.sendall(v2("198.51.100.7"))
    assert read_to_end(client.sock) == b""
    client.close()
