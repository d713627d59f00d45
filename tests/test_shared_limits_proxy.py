"""Per-client limits shared through Redis, through real ``edgeproxy serve`` processes (design.md §8):
they hold across the workers of one node and across nodes, and a Redis outage costs no mail.

The unit-level behaviour (the script, expiry, fallback rules) is in test_sharedlimits.py.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from tests.backends import AiosmtpdSink
from tests.conftest import wait_for
from tests.redis_server import RedisServer
from tests.test_lifecycle import ServeProcess

TOO_MANY_CONNECTIONS = POLICY_DEFAULTS["TOO_MANY_CONNECTIONS"].encode()
RATE_LIMITED = POLICY_DEFAULTS["RATE_LIMITED"].encode()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def nodes(logged_proxy, sink: AiosmtpdSink) -> Callable[..., ServeProcess]:
    """Proxy processes (nodes) in front of the one sink."""
    return lambda **env: logged_proxy(sink.address, **env)


def greeting(port: int, held: list[socket.socket]) -> bytes:
    """Open a connection (kept open in ``held``) and return the first reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.append(sock)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_the_per_client_connection_limit_holds_across_two_workers(nodes, redis_server) -> None:
    """Each worker alone would admit two connections from 127.0.0.1; shared, the node admits two."""
    node = nodes(workers="2", max_connections_per_ip="2", redis_url=redis_server.url)
    held: list[socket.socket] = []
    replies = [greeting(node.port, held) for _ in range(6)]
    admitted = [reply for reply in replies if reply.startswith(b"220 ")]
    assert len(admitted) == 2, replies
    assert replies.count(TOO_MANY_CONNECTIONS) == 4
    for sock in held:
        sock.close()


def test_the_per_client_limits_hold_across_two_nodes(nodes, redis_server) -> None:
    first = nodes(max_connections_per_ip="1", redis_url=redis_server.url)
    second = nodes(max_connections_per_ip="1", redis_url=redis_server.url)
    held: list[socket.socket] = []
    assert greeting(first.port, held).startswith(b"220 ")
    assert greeting(second.port, held) == TOO_MANY_CONNECTIONS
    held[0].close()  # released on the first node: the second now admits
    assert wait_for(lambda: greeting(second.port, held).startswith(b"220 "), 5)
    for sock in held:
        sock.close()


def test_the_connection_rate_is_counted_across_two_nodes(nodes, redis_server) -> None:
    first = nodes(connection_rate="3", max_connections_per_ip="0", redis_url=redis_server.url)
    second = nodes(connection_rate="3", max_connections_per_ip="0", redis_url=redis_server.url)
    held: list[socket.socket] = []
    replies = [greeting(port, held) for port in (first.port, second.port, first.port, second.port)]
    assert [reply.startswith(b"220 ") for reply in replies] == [True, True, True, False]
    assert replies[3] == RATE_LIMITED
    for sock in held:
        sock.close()


def test_redis_killed_and_restarted_under_load_costs_no_session_and_no_message(nodes, redis_server, sink) -> None:
    """Messages delivered one session after another, within the limits throughout: Redis dies
    half way and comes back. Every session is admitted (the local limits would admit each),
    every message is acknowledged and delivered once, and the outage is one line each way."""
    node = nodes(max_connections_per_ip="5", connection_rate="10000", redis_url=redis_server.url,
                 redis_timeout="0.05")
    total = 60
    for number in range(total):
        if number == 20:
            redis_server.stop()
        if number == 40:
            redis_server.start()
            time.sleep(1.2)  # past the retry interval: this session's admission is the trial
        with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
            client.sendmail("a@b.test", ["u@example.test"], f"Subject: {number}\r\n\r\nmessage {number}\r\n")
    assert wait_for(lambda: len(sink.messages) == total, 10)
    subjects = sorted(int(message.data.split(b"Subject: ")[1].split(b"\r\n")[0]) for message in sink.messages)
    assert subjects == list(range(total))
    assert wait_for(lambda: node.count("redis_up") == 1, 5)
    assert node.count("redis_down") == 1
    assert node.refusals() == []


def test_auth_failures_are_counted_across_two_nodes(nodes, redis_server, tmp_path) -> None:
    """AUTH_FAILURE_LIMIT=2: two wrong passwords on one node, and the other node refuses the
    client's next attempt (454 4.7.0) before checking it, where alone it would have checked it."""
    import ssl

    from edgeproxy.auth import hash_password
    from edgeproxy.smtp import replies as r
    from edgeproxy.tls import make_self_signed

    cert, key = make_self_signed("proxy.test", str(tmp_path))
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('right-Password-1')}\n", encoding="utf-8")
    settings = {"tls_cert": cert, "tls_key": key, "auth": "file", "auth_users": str(users),
                "auth_failure_limit": "2", "auth_failure_delay": "0", "redis_url": redis_server.url}
    first, second = nodes(**settings), nodes(**settings)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    def login(port: int, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.starttls(context=context)
            client.ehlo()
            client.user, client.password = "alice", password
            try:  # one mechanism: login() would try the next one after a 535, a second failure
                client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPResponseException as error:
                return error.smtp_code
            return 235

    assert login(first.port, "wrong-1") == 535
    assert login(first.port, "wrong-2") == 535
    assert wait_for(lambda: login(second.port, "right-Password-1") == r.AUTH_BLOCKED.code, 5)
