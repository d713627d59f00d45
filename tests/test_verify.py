"""Recipient verification (EDGEPROXY_VERIFY_RECIPIENTS) and the directory-harvest tarpit
(EDGEPROXY_HARVEST_LIMIT / HARVEST_DELAY): the cache's rules on its own, then each behaviour
through the real proxy to a real backend that knows which mailboxes exist."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edgeproxy import fastpath_common as fc
from edgeproxy.policy import Policy
from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import events as ev
from edgeproxy.smtp.capabilities import Capabilities
from edgeproxy.smtp.interface import SessionLimits
from edgeproxy.smtp.recipients import is_unknown_recipient
from edgeproxy.smtp.session import SmtpSession
from edgeproxy.verify import CHANNEL, RecipientCache
from tests.backends import PipeliningSink
from tests.conftest import wait_for
from tests.redis_server import RedisServer
from tests.session_driver import FULL_BACKEND, HOSTNAME, settings
from tests.test_proxy_e2e import raw_session, reply_codes

UNKNOWN = b"550 5.1.1 <ghost@example.test>: Recipient address rejected: User unknown\r\n"
UNKNOWN_USER = POLICY_DEFAULTS["UNKNOWN_USER"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the cache --------------------------------------------------------------------------------------


def test_unknown_and_accepted_recipients_are_remembered_for_their_ttl() -> None:
    clock = Clock()
    cache = RecipientCache(100, negative_ttl=60, positive_ttl=600, clock=clock)
    cache.learn("ghost@example.test", 550, UNKNOWN)
    cache.learn("user@example.test", 250, b"250 2.1.5 Ok\r\n")
    assert cache.known("ghost@example.test") is False and cache.known("user@example.test") is True
    clock.now += 61
    assert cache.known("ghost@example.test") is None and cache.known("user@example.test") is True
    clock.now += 600
    assert cache.known("user@example.test") is None
    assert len(cache) == 0


@pytest.mark.parametrize("code, reply", [
    (450, b"450 4.2.1 Mailbox busy\r\n"),
    (451, b"451 4.3.0 Temporary lookup failure\r\n"),
    (550, b"550 5.7.1 Sender refused by policy\r\n"),
    (553, b"553 5.1.3 Bad recipient address syntax\r\n"),
    (550, b"550 Recipient refused\r\n"),  # no enhanced code: nothing says it is the mailbox
])
def test_temporary_and_other_refusals_are_never_remembered(code: int, reply: bytes) -> None:
    cache = RecipientCache(100, 60, 600)
    cache.learn("someone@example.test", code, reply)
    assert cache.known("someone@example.test") is None


def test_unknown_mailbox_codes() -> None:
    assert is_unknown_recipient(550, UNKNOWN)
    assert is_unknown_recipient(550, b"550-5.1.1 The email account does not exist\r\n550 5.1.1 more\r\n")
    assert is_unknown_recipient(550, b"550 5.1.0 RESOLVER.ADR.RecipNotFound\r\n")
    assert is_unknown_recipient(551, b"551 5.1.6 User has moved\r\n")
    assert not is_unknown_recipient(450, b"450 4.1.1 Recipient unknown, try later\r\n")
    assert not is_unknown_recipient(550, b"550 5.1.10 Null MX\r\n")


def test_an_acceptance_replaces_a_remembered_refusal_and_keys_ignore_quoting_and_case() -> None:
    cache = RecipientCache(100, 60, 600)
    cache.learn('"Ghost"@Example.TEST', 550, UNKNOWN)
    assert cache.known("ghost@example.test") is False
    cache.learn("ghost@example.test", 250, b"250 2.1.5 Ok\r\n")  # the mailbox was created
    assert cache.known('"GHOST"@example.test') is True


def test_memory_is_bounded_least_recently_used_first() -> None:
    cache = RecipientCache(3, 60, 600)
    for name in ("a", "b", "c"):
        cache.learn(f"{name}@example.test", 550, UNKNOWN)
    assert cache.known("a@example.test") is False  # a is used: b is now the oldest
    cache.learn("d@example.test", 550, UNKNOWN)
    assert len(cache) == 3
    assert cache.known("b@example.test") is None
    assert [cache.known(f"{name}@example.test") for name in "acd"] == [False, False, False]


# -- through the proxy -----------------------------------------------------------------------------


@pytest.fixture
def directory_sink() -> Iterator[PipeliningSink]:
    """A backend that knows user@ and refuses ghost@ as unknown."""
    with PipeliningSink(rcpt_replies={"ghost@example.test": UNKNOWN}) as backend:
        yield backend


def rcpts_seen(sink: PipeliningSink, address: str) -> int:
    return sum(1 for line in sink.commands if line.upper().startswith(b"RCPT") and address.encode() in line)


def one_rcpt(port: int, address: str) -> bytes:
    """MAIL, one RCPT, QUIT; the RCPT's reply line."""
    reply = raw_session(port, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<%s>\r\nQUIT\r\n" % address.encode())
    lines = [line for line in reply.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]
    return lines[-2]  # (before QUIT's 221)


def test_a_remembered_unknown_recipient_is_refused_without_the_backend(make_proxy, directory_sink) -> None:
    proxy = make_proxy(directory_sink.address, verify_recipients="yes", harvest_limit="0")
    assert one_rcpt(proxy.port, "ghost@example.test") + b"\r\n" == UNKNOWN  # the backend's own word
    assert one_rcpt(proxy.port, "user@example.test").startswith(b"250 ")
    proxy.wait_quiet()
    commands = len(directory_sink.commands)
    # Now the proxy answers for the backend: no MAIL, no RCPT, nothing reaches it.
    assert one_rcpt(proxy.port, "GHOST@example.test") == UNKNOWN_USER.encode().rstrip(b"\r\n")
    proxy.wait_quiet()
    assert len(directory_sink.commands) == commands
    assert rcpts_seen(directory_sink, "ghost@example.test") == 1
    # An accepted recipient still goes to the backend: its acceptance is the backend's to give.
    assert one_rcpt(proxy.port, "user@example.test").startswith(b"250 ")
    assert rcpts_seen(directory_sink, "user@example.test") == 2


def test_a_temporary_refusal_is_not_remembered(make_proxy) -> None:
    busy = b"450 4.2.1 <ghost@example.test>: mailbox busy\r\n"
    with PipeliningSink(rcpt_replies={"ghost@example.test": busy}) as backend:
        proxy = make_proxy(backend.address, verify_recipients="yes")
        for _ in range(2):
            assert one_rcpt(proxy.port, "ghost@example.test") + b"\r\n" == busy
        assert rcpts_seen(backend, "ghost@example.test") == 2


def test_without_verification_every_rcpt_goes_to_the_backend(make_proxy, directory_sink) -> None:
    proxy = make_proxy(directory_sink.address, harvest_limit="0")
    for _ in range(2):
        assert one_rcpt(proxy.port, "ghost@example.test") + b"\r\n" == UNKNOWN
    assert rcpts_seen(directory_sink, "ghost@example.test") == 2


def test_sighup_forgets_what_was_remembered(logged_proxy, directory_sink) -> None:
    proxy = logged_proxy(directory_sink.address, verify_recipients="yes")
    assert one_rcpt(proxy.port, "ghost@example.test") + b"\r\n" == UNKNOWN
    directory_sink.rcpt_replies.clear()  # the mailbox is created
    assert one_rcpt(proxy.port, "ghost@example.test").startswith(b"550 ")  # remembered still
    assert rcpts_seen(directory_sink, "ghost@example.test") == 1
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: proxy.count("reloaded") == 1, 10)
    assert one_rcpt(proxy.port, "ghost@example.test").startswith(b"250 ")
    assert rcpts_seen(directory_sink, "ghost@example.test") == 2


def test_verdicts_are_shared_between_nodes_through_redis(logged_proxy, directory_sink) -> None:
    """Node A learns ghost@ is unknown; node B refuses it without asking the backend. SIGHUP on A
    makes B forget too (the mailbox was created meanwhile)."""
    import redis

    with RedisServer() as redis_server:
        env = {"verify_recipients": "yes", "redis_url": redis_server.url}
        node_a, node_b = logged_proxy(directory_sink.address, **env), logged_proxy(directory_sink.address, **env)
        watcher = redis.Redis.from_url(redis_server.url)
        assert wait_for(lambda: watcher.pubsub_numsub(CHANNEL)[0][1] == 2, 10)  # both nodes listen
        heard = watcher.pubsub(ignore_subscribe_messages=True)
        heard.subscribe(CHANNEL)

        def published() -> bytes:
            deadline = time.monotonic() + 10
            message = None
            while message is None and time.monotonic() < deadline:  # (None for a subscription's own)
                message = heard.get_message(timeout=1)
            assert message is not None, "nothing published"
            time.sleep(0.2)  # node B hears it as the watcher did
            return message["data"]

        assert one_rcpt(node_a.port, "ghost@example.test") + b"\r\n" == UNKNOWN
        assert published().endswith(b" ghost@example.test")
        assert one_rcpt(node_b.port, "ghost@example.test").startswith(b"550 5.1.1 Recipient")
        assert rcpts_seen(directory_sink, "ghost@example.test") == 1
        directory_sink.rcpt_replies.clear()
        node_a.signal(signal.SIGHUP)
        assert published().endswith(b" forget")
        assert one_rcpt(node_b.port, "ghost@example.test").startswith(b"250 ")
        heard.close()
        watcher.close()


def test_with_redis_down_each_node_remembers_for_itself(logged_proxy, directory_sink) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{unused.getsockname()[1]}/0"
    proxy = logged_proxy(directory_sink.address, verify_recipients="yes", redis_url=url)
    assert one_rcpt(proxy.port, "ghost@example.test") + b"\r\n" == UNKNOWN
    assert one_rcpt(proxy.port, "ghost@example.test").startswith(b"550 5.1.1 Recipient")
    assert rcpts_seen(directory_sink, "ghost@example.test") == 1


# -- the harvest tarpit ----------------------------------------------------------------------------


def harvest(port: int, count: int, sock_timeout: float = 20) -> tuple[socket.socket, list[float]]:
    """Open a session and pipeline ``count`` RCPTs to unknown users; returns the socket and when
    (monotonic) each RCPT reply arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=sock_timeout)
    assert sock.recv(4096).startswith(b"220 ")
    rcpts = b"".join(b"RCPT TO:<nobody%d@example.test>\r\n" % n for n in range(count))
    sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts)
    arrivals: list[float] = []
    received = b""
    while len(reply_codes(received)) < 2 + count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
        arrivals += [time.monotonic()] * (len(reply_codes(received)) - 2 - len(arrivals))
    return sock, arrivals


def test_rcpt_replies_past_the_harvest_limit_are_delayed(make_proxy, pipelining_sink) -> None:
    proxy = make_proxy(pipelining_sink.address, recipients="known@example.test", harvest_limit="3",
                       harvest_delay="1")
    started = time.monotonic()
    sock, arrivals = harvest(proxy.port, 5)
    with sock:
        assert len(arrivals) == 5
        # The first three refusals (550 5.1.1 from the directory) come at once; the fourth waits a
        # delay, and the fifth a delay behind the fourth (replies leave in command order).
        assert arrivals[2] - started < 1.0
        assert arrivals[3] - started >= 1.0
        assert arrivals[4] - started >= 2.0


def test_the_tarpit_holds_up_nobody_else(make_proxy, pipelining_sink) -> None:
    proxy = make_proxy(pipelining_sink.address, recipients="known@example.test", harvest_limit="1",
                       harvest_delay="2")
    results: dict[str, object] = {}

    def harvester() -> None:
        sock, arrivals = harvest(proxy.port, 2)
        results["harvester_done"] = time.monotonic()
        results["harvester_replies"] = len(arrivals)
        sock.close()

    thread = threading.Thread(target=harvester)
    thread.start()
    time.sleep(0.3)  # the harvester's second RCPT reply is held now
    with proxy.client() as client:
        assert client.sendmail("a@b.test", ["known@example.test"], "Subject: x\r\n\r\nhello\r\n") == {}
    results["legitimate_done"] = time.monotonic()
    thread.join(20)
    assert results["harvester_replies"] == 2
    assert results["legitimate_done"] < results["harvester_done"]  # type: ignore[operator]
    assert wait_for(lambda: len(pipelining_sink.messages) == 1)


def test_backend_unknown_recipient_refusals_count_toward_the_harvest_limit(make_proxy) -> None:
    """Without a directory or verification, the backend's 5.1.1s count: a harvester asking one
    RCPT at a time waits from its third guess on."""
    replies = {f"nobody{n}@example.test": UNKNOWN for n in range(4)}
    with PipeliningSink(rcpt_replies=replies) as backend:
        proxy = make_proxy(backend.address, harvest_limit="2", harvest_delay="1")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
            assert sock.recv(4096).startswith(b"220 ")
            sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
            received = b""
            while len(reply_codes(received)) < 2:
                received += sock.recv(65536)
            waits = []
            for number in range(4):
                asked = time.monotonic()
                sock.sendall(b"RCPT TO:<nobody%d@example.test>\r\n" % number)
                reply = sock.recv(65536)
                waits.append(time.monotonic() - asked)
                assert reply.startswith(b"550 5.1.1 <ghost"), reply
        assert waits[0] < 1.0 and waits[1] < 1.0
        assert waits[2] >= 1.0 and waits[3] >= 1.0


def test_max_errors_still_ends_a_harvesting_session(make_proxy, pipelining_sink) -> None:
    proxy = make_proxy(pipelining_sink.address, recipients="known@example.test", harvest_limit="1",
                       harvest_delay="0.5", max_errors="3")
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    with sock:
        assert sock.recv(4096).startswith(b"220 ")
        rcpts = b"".join(b"RCPT TO:<nobody%d@example.test>\r\n" % n for n in range(10))
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert reply_codes(received) == [250, 250, 550, 550, 550, 421]


# -- the core, sans I/O ----------------------------------------------------------------------------


def core_session(verdicts: RecipientCache | None = None, **limits: object) -> SmtpSession:
    config = settings(recipients="known@example.test")
    session_limits = SessionLimits(HOSTNAME, 512, 2048, 20, False, False, False, **limits)  # type: ignore[arg-type]
    capabilities = Capabilities.negotiate(config.max_message_size, list(FULL_BACKEND))
    session = SmtpSession(session_limits, Policy(config), capabilities, "192.0.2.7", fc.GRANT_NONE,
                          verdicts=verdicts)
    session.greeting()
    return session


def test_the_core_holds_replies_past_the_limit_until_the_io_layer_releases_them() -> None:
    session = core_session(harvest_limit=1, harvest_delay=5.0)
    session.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n"
                         b"RCPT TO:<y@example.test>\r\nNOOP\r\n")
    assert reply_codes(session.take_output()) == [250, 250, 550]  # the second 550 is held, NOOP's behind it
    (delay,) = [event for event in session.take_events() if isinstance(event, ev.DelayReply)]
    assert delay.seconds == 5.0 and delay.slot.data is not None and delay.slot.held
    assert session.take_output() == b""
    session.release(delay.slot)
    assert reply_codes(session.take_output()) == [550, 250]


def test_the_core_refuses_a_remembered_unknown_without_a_backend_command() -> None:
    cache = RecipientCache(10, 60, 600)
    cache.learn("ghost@example.org", 550, UNKNOWN)
    session = core_session(cache)
    # example.org is not local here: the verdict is not consulted for a relay refusal...
    session.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ghost@example.org>\r\n")
    assert reply_codes(session.take_output())[-1] == 554
    # ...only for a domain the backend answers for without a directory.
    cache.learn("ghost@example.test", 550, UNKNOWN)
    session.receive_data(b"RCPT TO:<ghost@example.test>\r\n")
    assert reply_codes(session.take_output())[-1] == 550
    assert not [event for event in session.take_events() if isinstance(event, ev.BackendSend)]
    assert session.unknown_recipients == 1
