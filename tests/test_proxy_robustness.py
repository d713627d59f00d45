"""One named regression test per robustness finding, through the running proxy to a real backend.

What a client can make the proxy hold (input, recipients, its connection slot, time), what the
backend connections cost and how their failures are handled, and what client bytes may reach the
backend and the logs. Every wait is bounded; "after about N seconds" is asserted with wide slack.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
from structlog.testing import capture_logs

from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import replies as r
from tests.backends import PipeliningSink
from tests.conftest import wait_for
from tests.test_proxy_attacks import Client, start_message
from tests.test_proxy_e2e import raw_session, reply_codes
from tests.test_proxy_faults import delivered_numbers, numbered

TOO_MANY_RECIPIENTS = POLICY_DEFAULTS["TOO_MANY_RECIPIENTS"]
TOO_MANY_CONNECTIONS = POLICY_DEFAULTS["TOO_MANY_CONNECTIONS"]
RELAY_DENIED = POLICY_DEFAULTS["RELAY_DENIED"]
MB = 1 << 20


# -- helpers ------------------------------------------------------------------------------------


def replies_in(data: bytes) -> list[bytes]:
    """Each complete reply (a multi-line reply as one), with its CRLFs."""
    replies, current = [], b""
    for line in data.split(b"\r\n")[:-1]:
        current += line + b"\r\n"
        if line[3:4] == b" ":
            replies.append(current)
            current = b""
    return replies


def push(sock: socket.socket, block: bytes, seconds: float, most: int = 64 * MB) -> int:
    """Send ``block`` over and over, without reading, for ``seconds`` or until ``most`` octets
    went out: what the proxy (and the kernel's buffers) took."""
    data = memoryview(block)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < most:
        try:
            sent += sock.send(data[sent % len(data):])
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
    return sent


def read_to_end(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the proxy closes; a reset after the last byte counts as closing too."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def assert_closed(client: Client) -> None:
    """Nothing more after the last reply: EOF (or a reset, if our last bytes crossed the close)."""
    assert client.buffer == b""
    assert read_to_end(client.sock, timeout=5) == b""


def deliver(client: Client, number: int) -> bytes:
    """One whole transaction with replies read one by one; the final reply."""
    assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<u@example.test>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    return client.command(numbered(number) + b".\r\n")


def events(lines: list[dict], name: str) -> list[dict]:
    return [line for line in lines if line.get("event") == name]


# -- 1. input held unanswered is bounded --------------------------------------------------------


def test_client_input_held_behind_a_slow_backend_reply_is_bounded(make_proxy) -> None:
    """While the backend sits on a RCPT, the client's pipelined commands cannot be answered; the
    proxy must stop reading at MAX_PENDING_INPUT instead of holding whatever the client sends.

    The NOOPs carry an argument (legal, RFC 5321 §4.1.1.9) so that the bytes pushed do not depend
    on how fast the proxy interprets lines: an unbounded proxy takes 64 MB of 500-octet lines in
    well under the 3 s. What the kernel buffers on loopback (several MB) is allowed for."""
    with PipeliningSink(rcpt_delay=5) as backend:
        # The NOOP loop's own limit would end the session first (the next test): out of the way.
        proxy = make_proxy(backend.address, junk_command_limit="1000000")
        client = Client(proxy.port)
        client.sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\n")
        sent = push(client.sock, (b"NOOP " + b"x" * 493 + b"\r\n") * 128, seconds=3)
        assert sent < 20 * MB, f"the proxy read {sent / MB:.0f} MB from a client it could not answer"
        # The session still works: once the backend answers, every reply comes, in order.
        client.sock.settimeout(15)
        assert client.read_reply().startswith(b"250-")  # EHLO
        assert client.read_reply() == r.SENDER_OK.encode()
        assert client.read_reply().startswith(b"250 2.1.5")  # the backend's own RCPT reply
        for _ in range(100):
            assert client.read_reply() == r.OK.encode()
        client.close()


def test_session_closed_behind_a_held_backend_reply_stops_reading(make_proxy) -> None:
    """Found by this file's first test: NOOPs past JUNK_COMMAND_LIMIT end the session with 421,
    but that last reply waits behind the backend's held RCPT reply. A closed session interprets
    nothing more, and the proxy used to go on reading (and dropping) all the client sent: 64 MB
    in a fraction of a second. It stops reading instead, and the 421 follows the held replies."""
    with PipeliningSink(rcpt_delay=3) as backend:
        proxy = make_proxy(backend.address)
        client = Client(proxy.port)
        client.sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\n")
        sent = push(client.sock, b"NOOP\r\n" * 10000, seconds=2)
        assert sent < 20 * MB, f"the proxy read {sent / MB:.0f} MB for a session it had closed"
        replies = replies_in(read_to_end(client.sock, timeout=15))
        assert replies[2].startswith(b"250 2.1.5")  # the backend's RCPT reply, held 3 s
        assert replies[-1] == r.TOO_MANY_ERRORS.encode()
        assert all(reply == r.OK.encode() for reply in replies[3:-1])


# -- 2. recipient floods -------------------------------------------------------------------------


def test_recipient_flood_past_the_overshoot_limit_counts_as_errors_and_is_disconnected(make_proxy, sink) -> None:
    """MAX_RECIPIENTS=3, RECIPIENT_OVERSHOOT_LIMIT=5, MAX_ERRORS=4, 50 RCPTs pipelined:

    - RCPT 1-3: accepted (the backend's 250);
    - RCPT 4-8: 452, the 5 allowed past the limit, no error counted;
    - RCPT 9-12: 452 each, and each now counts as an error (errors 1 to 4);
    - the 4th error reaches MAX_ERRORS: after RCPT 12's 452 comes the 421, then EOF.

    So 3 x 250, then 5 + 4 = 9 x 452, then 421; the QUIT at the end is never read."""
    proxy = make_proxy(sink.address, max_recipients="3", recipient_overshoot_limit="5", max_errors="4")
    rcpts = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % n for n in range(50))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        assert sock.recv(4096).startswith(b"220 ")
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + rcpts + b"QUIT\r\n")
        received = read_to_end(sock)
    replies = replies_in(received)
    assert reply_codes(received) == [250, 250] + [250] * 3 + [TOO_MANY_RECIPIENTS.code] * 9 + [r.TOO_MANY_ERRORS.code]
    assert replies[5:14] == [TOO_MANY_RECIPIENTS.encode()] * 9
    assert replies[-1] == r.TOO_MANY_ERRORS.encode()


def test_large_legitimate_mailing_past_max_recipients_is_not_disconnected(make_proxy, sink) -> None:
    """A mailing to more recipients than MAX_RECIPIENTS gets 452 for the rest (the client sends
    them in a later transaction, RFC 5321 §4.5.3.1.10) and is not counted toward MAX_ERRORS."""
    proxy = make_proxy(sink.address, max_recipients="3", max_errors="4")
    recipients = [f"u{n}@example.test" for n in range(10)]
    with proxy.client() as client:
        refused = client.sendmail("a@b.test", recipients, numbered(1))
        assert sorted(refused) == recipients[3:]
        assert {code for code, _ in refused.values()} == {TOO_MANY_RECIPIENTS.code}
        assert client.noop()[0] == 250  # still connected
    assert wait_for(lambda: len(sink.messages) == 1)
    assert sink.messages[0].rcpt_tos == recipients[:3]


def test_a_run_of_identical_refusals_is_logged_once_with_its_count(logged_proxy, pipelining_sink) -> None:
    """Seven 452s in a row (same stage, rule, sender) are one refusal record with count=7, and
    the three relay refusals that follow (another rule) one with count=3, both in the session's
    one closing line: not one line per refusal, so a client cannot make the log its amplifier."""
    proxy = logged_proxy(pipelining_sink.address, max_recipients="3")
    local = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % n for n in range(10))
    foreign = b"".join(b"RCPT TO:<v%d@elsewhere.test>\r\n" % n for n in range(3))
    payload = (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + local + b"RSET\r\nMAIL FROM:<a@b.test>\r\n" + foreign
               + b"QUIT\r\n")
    reply = raw_session(proxy.port, payload)
    assert reply_codes(reply) == ([250, 250] + [250] * 3 + [TOO_MANY_RECIPIENTS.code] * 7 + [250, 250]
                                  + [RELAY_DENIED.code] * 3 + [221])
    assert wait_for(lambda: len(events(proxy.lines, "session")) == 1, 10)
    assert events(proxy.lines, "refused") == []
    (session,) = events(proxy.lines, "session")
    runs = session["refused"]
    assert [(run["rule"], run["count"]) for run in runs] == [("too_many_recipients", 7), ("relay_denied", 3)], runs
    assert runs[1]["recipient_domain"] == "elsewhere.test" and runs[1]["sender"] == "a@b.test"
    assert runs[1]["reply"] == str(RELAY_DENIED) and session["helo"] == "c" and session["refusals"] == 10


def test_a_client_probing_many_forms_gets_refusal_lines_of_its_own(logged_proxy, pipelining_sink) -> None:
    """Past the runs a session line carries, each further run is written as its own ``refused``
    line as soon as it ends: a probe of many forms is on record before its session ends, and the
    lines stay one per run."""
    held = 8  # RefusalLog.HELD_RUNS
    proxy = logged_proxy(pipelining_sink.address, max_errors="100")
    probes = [b"RCPT TO:<u@d%d.elsewhere.test>\r\n" % n for n in range(held + 3)]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"".join(probes) + probes[-1])
        received = b""
        while len(reply_codes(received)) < 1 + 2 + len(probes) + 1:  # greeting, EHLO, MAIL, probes
            received += client.recv(65536)
        # The session goes on; the held runs and the one that ended are on record already.
        assert wait_for(lambda: len(events(proxy.lines, "refused")) == held + 2, 10), proxy.lines
        assert events(proxy.lines, "session") == []
        client.sendall(b"QUIT\r\n")
        read_to_end(client)
    assert wait_for(lambda: len(events(proxy.lines, "session")) == 1, 10)
    refused = events(proxy.lines, "refused")
    assert [line["recipient_domain"] for line in refused] == [f"d{n}.elsewhere.test" for n in range(held + 3)]
    assert [line["count"] for line in refused] == [1] * (held + 2) + [2]
    (session,) = events(proxy.lines, "session")
    assert session["refused"] is None and session["refusals"] == held + 4


# -- 3. a client that never reads --------------------------------------------------------------


def test_never_reading_client_is_cut_off_and_its_slot_freed(make_proxy, sink) -> None:
    """A client that sends and never reads fills the buffers both ways; within TIMEOUT (plus
    slack) the proxy must abort it, not wait forever for its replies to drain, so that the
    connection slot (MAX_CONNECTIONS=1 here) goes to the next client."""
    proxy = make_proxy(sink.address, timeout="2", max_connections="1")
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    hog.settimeout(10)
    hog.connect(("127.0.0.1", proxy.port))
    try:
        assert hog.recv(4096).startswith(b"220 ")
        hog.setblocking(False)
        noops = b"EHLO hog.test\r\n" + b"NOOP\r\n" * 10000
        cut_off = False
        # Fill: send until nothing more is taken for a second (both directions are full).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                hog.send(noops)
                noops = b"NOOP\r\n" * 10000
            except BlockingIOError:
                if not select.select([], [hog], [], 1)[1]:
                    break
            except OSError:
                cut_off = True
                break
        # Wait for the proxy to cut it off: a send fails with a reset or a broken pipe.
        deadline = time.monotonic() + 15
        while not cut_off and time.monotonic() < deadline:
            if not select.select([], [hog], [], 0.2)[1]:
                continue
            try:
                hog.send(b"NOOP\r\n")
            except BlockingIOError:
                continue
            except OSError:
                cut_off = True
        assert cut_off, "the proxy kept a client that never reads"
    finally:
        hog.close()

    def next_client_greeted() -> bool:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            first = sock.recv(4096)
        assert first.startswith(b"220 ") or first == TOO_MANY_CONNECTIONS.encode(), first
        return first.startswith(b"220 ")

    # The slot is freed as the connection is torn down, which the client may see a moment first.
    assert wait_for(next_client_greeted, 5)


# -- 4. trickling clients and the session time limit --------------------------------------------


def test_trickling_client_must_complete_a_line_within_the_timeout(make_proxy, sink) -> None:
    """A byte every 0.5 s, never a CRLF: every byte used to restart the timer. A command line
    must now complete within TIMEOUT (2 s)."""
    proxy = make_proxy(sink.address, timeout="2")
    client = Client(proxy.port)
    started = time.monotonic()
    trickle = b"NOOP " + b"x" * 200
    for byte in trickle:
        if time.monotonic() - started > 12 or select.select([client.sock], [], [], 0.5)[0]:
            break  # the proxy said something: it should be the timeout
        try:
            client.sock.send(bytes([byte]))
        except OSError:
            break
    reply = client.read_reply()
    elapsed = time.monotonic() - started
    assert reply == r.TIMEOUT.encode(), f"after {elapsed:.1f} s: {reply!r}"
    assert 1.5 <= elapsed < 8, f"the timeout came {elapsed:.1f} s after the greeting (the trickle stopped at 12 s)"
    assert_closed(client)
    client.close()


def test_busy_session_ends_at_the_session_time_limit(make_proxy, sink) -> None:
    """A complete NOOP every 0.5 s keeps TIMEOUT (2 s) from ever firing; SESSION_TIMEOUT (3 s)
    still ends the session."""
    proxy = make_proxy(sink.address, timeout="2", session_timeout="3")
    client = Client(proxy.port)
    started = time.monotonic()
    reply = r.OK.encode()
    while reply == r.OK.encode() and time.monotonic() - started < 12:
        if select.select([client.sock], [], [], 0.5)[0]:
            reply = client.read_reply()  # unasked for: the proxy is ending the session
            break
        with contextlib.suppress(OSError):  # closed just now: its last reply is still to be read
            client.sock.sendall(b"NOOP\r\n")
        reply = client.read_reply()
    elapsed = time.monotonic() - started
    assert reply == r.SESSION_TIMEOUT.encode(), f"after {elapsed:.1f} s: {reply!r}"
    assert 2.5 <= elapsed < 8
    assert_closed(client)
    client.close()


# -- 5. XCLIENT on every backend connection ------------------------------------------------------


def test_xclient_announces_every_client_even_on_new_backend_connections(make_proxy) -> None:
    """Three transactions open at once need three backend connections, two of them new; each
    message must carry its own client's address and HELO (the first transaction on a new
    connection used to go without XCLIENT: its keywords were not known yet)."""
    names = [b"one.client.test", b"two.client.test", b"three.client.test"]
    with PipeliningSink(xclient=True) as backend:
        proxy = make_proxy(backend.address)
        clients = [Client(proxy.port) for _ in names]
        for number, (client, name) in enumerate(zip(clients, names, strict=True)):
            assert client.command(b"EHLO %s\r\n" % name).startswith(b"250")
            assert client.command(b"MAIL FROM:<s%d@sender.test>\r\n" % number).startswith(b"250")
            assert client.command(b"RCPT TO:<u@example.test>\r\n").startswith(b"250")
        for number, client in enumerate(clients):
            assert client.command(b"DATA\r\n").startswith(b"354")
            assert client.command(numbered(number) + b".\r\n").startswith(b"250")
            client.close()
        assert wait_for(lambda: len(backend.messages) == 3)
        assert backend.connections >= 3
        seen = {message.mail_from: message.xclient for message in backend.messages}
        for number, name in enumerate(names):
            xclient = seen[f"s{number}@sender.test"]
            assert xclient.get("ADDR") == "127.0.0.1", xclient
            assert xclient.get("HELO") == name.decode(), xclient


# -- 6. the backend connection budget -----------------------------------------------------------


def test_backend_connections_stay_within_the_budget(make_proxy) -> None:
    """Ten clients deliver at once and stay connected: every message arrives, and the backend
    never holds more than BACKEND_MAX_CONNECTIONS=2 connections (idle sessions hold none)."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address, backend_max_connections="2")
        start = threading.Barrier(10, timeout=10)
        finish = threading.Event()
        delivered: list[int] = []
        errors: list[BaseException] = []

        def client(number: int) -> None:
            try:
                with proxy.client() as smtp:
                    start.wait()
                    smtp.sendmail("a@b.test", ["u@example.test"], numbered(number))
                    delivered.append(number)
                    finish.wait(30)  # connected and idle while the others deliver
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=client, args=(number,), daemon=True) for number in range(10)]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: len(delivered) + len(errors) == 10, 30)
            assert errors == []
            assert wait_for(lambda: len(backend.messages) == 10)
            assert delivered_numbers(backend) == list(range(10))
            assert backend.max_open_connections <= 2
        finally:
            finish.set()
            for thread in threads:
                thread.join(10)


def test_transaction_waiting_for_a_backend_connection_gets_451_after_the_queue_timeout(make_proxy) -> None:
    """Budget 1: while A's transaction holds the only connection, B's RCPT waits
    BACKEND_QUEUE_TIMEOUT (1 s) and gets BACKEND_BUSY; once A's transaction is over, its
    connection goes back to the pool and B delivers in a new transaction."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address, backend_max_connections="1", backend_queue_timeout="1")
        a, b = Client(proxy.port), Client(proxy.port)
        assert a.command(b"EHLO a.test\r\n").startswith(b"250")
        assert a.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
        assert a.command(b"RCPT TO:<u@example.test>\r\n").startswith(b"250")  # A now holds it, and stalls
        assert b.command(b"EHLO b.test\r\n").startswith(b"250")
        assert b.command(b"MAIL FROM:<b@b.test>\r\n").startswith(b"250")
        started = time.monotonic()
        assert b.command(b"RCPT TO:<u@example.test>\r\n") == r.BACKEND_BUSY.encode()
        assert 0.8 <= time.monotonic() - started < 10
        assert a.command(b"DATA\r\n").startswith(b"354")
        assert a.command(numbered(1) + b".\r\n").startswith(b"250")
        assert b.command(b"RSET\r\n") == r.RESET_OK.encode()
        assert deliver(b, 2).startswith(b"250")
        a.close()
        b.close()
        assert wait_for(lambda: len(backend.messages) == 2)
        assert delivered_numbers(backend) == [1, 2]


def test_one_backend_connection_serves_two_connected_clients_in_turn(make_proxy) -> None:
    """Budget 1, two clients connected throughout, delivering alternately: the connection goes
    back to the pool after each transaction, so neither waits on the other's idle session."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address, backend_max_connections="1", backend_queue_timeout="5")
        with proxy.client() as first, proxy.client() as second:
            for round_ in range(3):
                first.sendmail("a@b.test", ["u@example.test"], numbered(2 * round_))
                second.sendmail("a@b.test", ["u@example.test"], numbered(2 * round_ + 1))
        assert wait_for(lambda: len(backend.messages) == 6)
        assert delivered_numbers(backend) == list(range(6))
        assert backend.max_open_connections == 1


# -- 7. a backend that is down -------------------------------------------------------------------


def test_backend_down_is_not_dialled_again_within_the_retry_interval(make_proxy) -> None:
    """The backend accepts and closes at once. After the failed attempt (the proxy's start-up
    probe), every transaction within BACKEND_RETRY_INTERVAL gets 451 4.4.1 without a new
    connection, and the outage is logged once, not once per RCPT."""
    with PipeliningSink(close_on_connect=True) as backend, capture_logs() as logs:
        proxy = make_proxy(backend.address, backend_retry_interval="5")
        for _ in range(20):
            client = Client(proxy.port)
            assert client.command(b"EHLO c\r\n").startswith(b"250")
            assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
            assert client.command(b"RCPT TO:<u@example.test>\r\n") == r.BACKEND_UNAVAILABLE.encode()
            client.close()
        assert backend.connections <= 2
    assert len(events(logs, "backend_down")) == 1, events(logs, "backend_down")


def test_backend_recovery_is_logged_with_the_number_of_refused_attempts(make_proxy) -> None:
    with PipeliningSink(close_on_connect=True) as backend, capture_logs() as logs:
        proxy = make_proxy(backend.address, backend_retry_interval="3")
        for _ in range(5):
            client = Client(proxy.port)
            assert client.command(b"EHLO c\r\n").startswith(b"250")
            assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
            assert client.command(b"RCPT TO:<u@example.test>\r\n") == r.BACKEND_UNAVAILABLE.encode()
            client.close()
        backend.close_on_connect = False

        def delivered_after_recovery() -> bool:
            client = Client(proxy.port)
            try:
                assert client.command(b"EHLO c\r\n").startswith(b"250")
                assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
                reply = client.command(b"RCPT TO:<u@example.test>\r\n")
                if reply == r.BACKEND_UNAVAILABLE.encode():
                    time.sleep(0.2)  # still inside the retry window: the next attempt comes later
                    return False
                assert reply.startswith(b"250"), reply
                assert client.command(b"DATA\r\n").startswith(b"354")
                assert client.command(numbered(1) + b".\r\n").startswith(b"250")
                return True
            finally:
                client.close()

        assert wait_for(delivered_after_recovery, 15), "the backend is back, but the proxy does not use it"
        assert wait_for(lambda: len(events(logs, "backend_up")) >= 1), "no backend_up logged"
    assert len(events(logs, "backend_down")) == 1
    (up,) = events(logs, "backend_up")
    assert up.get("refused", 0) >= 5, up


def test_backend_closing_with_421_is_logged(make_proxy) -> None:
    with PipeliningSink(mail_reply=b"421 4.3.2 Going down\r\n", close_after_mail_reply=True) as backend, \
            capture_logs() as logs:
        proxy = make_proxy(backend.address)
        client = Client(proxy.port)
        assert client.command(b"EHLO c\r\n").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
        # The client's session goes on, so it gets a 4xx for its command, not the backend's 421.
        assert client.command(b"RCPT TO:<u@example.test>\r\n") == r.BACKEND_UNAVAILABLE.encode()
        assert client.command(b"NOOP\r\n") == r.OK.encode()
        client.close()
        assert wait_for(lambda: len(events(logs, "backend_closed")) >= 1), "the backend's 421 was not logged"
    assert [line.get("code") for line in events(logs, "backend_closed")] == [421]


# -- 8. control characters -----------------------------------------------------------------------

BAD_HELOS = {
    "esc-and-bel-in-ehlo": b"EHLO \x1b[31mRED\x1b[0m\x07",
    "c1-in-helo": "HELO bad\u0085name.test".encode(),
    "del-in-helo": b"HELO bad\x7fname.test",
}


@pytest.mark.parametrize("line", list(BAD_HELOS.values()), ids=list(BAD_HELOS))
def test_control_characters_in_helo_are_refused_and_never_reach_the_backend(make_proxy, line: bytes) -> None:
    """ESC, BEL, DEL and C1 controls in a HELO/EHLO argument get 501 5.5.2. The session keeps its
    earlier, valid HELO: that is what reaches XCLIENT and the Received: header, nothing else.
    (The backend offers SMTPUTF8 so that the UTF-8 C1 line is not refused for being 8-bit.)"""
    with PipeliningSink(xclient=True, smtputf8=True) as backend:
        proxy = make_proxy(backend.address)
        client = Client(proxy.port)
        assert client.command(b"EHLO good.client.test\r\n").startswith(b"250")
        assert client.command(line + b"\r\n") == r.HELO_BAD_CHARACTERS.encode()
        assert deliver(client, 1).startswith(b"250")
        client.close()
        assert wait_for(lambda: len(backend.messages) == 1)
        message = backend.messages[0]
        assert message.xclient.get("HELO") == "good.client.test"
        assert message.data.startswith(b"Received: from good.client.test ([127.0.0.1])")
        argument = line[5:]
        for sent in [*backend.commands, message.data]:
            assert argument not in sent
            assert not any(control in sent for control in (b"\x1b", b"\x07", b"\x7f", b"\xc2\x85"))


@pytest.mark.parametrize("helo", ["Mail-01.Client.test", "[192.0.2.1]"])
def test_valid_helo_reaches_xclient_and_received_header_unchanged(make_proxy, helo: str) -> None:
    with PipeliningSink(xclient=True) as backend:
        proxy = make_proxy(backend.address)
        client = Client(proxy.port)
        assert client.command(f"EHLO {helo}\r\n".encode()).startswith(b"250")
        assert deliver(client, 1).startswith(b"250")
        client.close()
        assert wait_for(lambda: len(backend.messages) == 1)
        message = backend.messages[0]
        assert message.xclient.get("HELO") == helo
        assert message.data.startswith(f"Received: from {helo} ([127.0.0.1])".encode())


def test_control_characters_in_helo_never_reach_a_log_line(logged_proxy, pipelining_sink) -> None:
    proxy = logged_proxy(pipelining_sink.address)
    reply = raw_session(proxy.port, BAD_HELOS["esc-and-bel-in-ehlo"] + b"\r\nQUIT\r\n")
    assert replies_in(reply) == [r.HELO_BAD_CHARACTERS.encode(), r.CLOSING.encode()]
    assert wait_for(lambda: len(events(proxy.lines, "session")) == 1, 10)
    logged = json.dumps(proxy.lines)  # every value, as the parsed lines hold it
    assert "\x1b" not in "".join(str(value) for line in proxy.lines for value in line.values())
    assert "[31mRED" not in logged and "\\u0007" not in logged


def console_log_of(value: str) -> bytes:
    """What edgeproxy's console log format writes for one line carrying ``value``, to a pipe (a
    process of its own, so this suite's logging configuration is left alone)."""
    script = (
        "import structlog, sys\n"
        "from edgeproxy import log\n"
        "log.configure('info', 'console')\n"
        "structlog.get_logger('edgeproxy').info('refused', helo=sys.argv[1], rule='test')\n"
    )
    # Colour is decided by the code under test, not by whoever runs the suite.
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    done = subprocess.run([sys.executable, "-c", script, value], capture_output=True, timeout=30, check=True, env=env)
    return done.stderr


def test_console_log_escapes_control_characters_from_the_client() -> None:
    output = console_log_of("\x1b[31mRED\x1b[0m\x07\x1b]0;owned\x07")
    assert b"RED" in output  # the line was written
    assert b"\x1b[31mRED" not in output and b"\x1b]0;" not in output and b"\x07" not in output


def test_console_log_written_to_a_non_terminal_has_no_escape_byte() -> None:
    """The spec's letter: no ESC byte at all in console output (here a pipe, as under a service
    manager), which also rules out the renderer's own colour sequences off a terminal."""
    output = console_log_of("\x1b[31mRED\x1b[0m\x07")
    assert b"RED" in output
    assert b"\x1b" not in output, output


def json_log_of(value: str) -> bytes:
    script = (
        "import sys, structlog\n"
        "from edgeproxy import log\n"
        "log.configure('info', 'json')\n"
        "structlog.get_logger('edgeproxy').info('refused', helo=sys.argv[1], rule='test', path=log)\n"
    )
    return subprocess.run([sys.executable, "-c", script, value], capture_output=True, timeout=30,
                          check=True).stderr


def test_json_log_escapes_control_characters_and_keeps_every_field() -> None:
    """The JSON lines (orjson, straight to stderr's bytes): control characters escaped, any
    value that is not JSON written as its text, the timestamp ISO 8601 UTC with microseconds."""
    import re

    output = json_log_of("\x1b[31mRED\x1b[0m\x07 caf\u00e9")
    assert output.count(b"\n") == 1 and b"\x1b" not in output and b"\x07" not in output
    line = json.loads(output)
    assert line["helo"] == "\x1b[31mRED\x1b[0m\x07 caf\u00e9"  # all there, once decoded
    assert (line["event"], line["rule"], line["level"]) == ("refused", "test", "info")
    assert line["path"].startswith("<module 'edgeproxy.log'")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"]), line["timestamp"]


# -- 9. a pooled connection that died while idle -------------------------------------------------


def test_dead_pooled_connection_is_replaced_and_the_transaction_replayed(make_proxy) -> None:
    """The backend drops a reused connection at MAIL without a reply. Nothing of the transaction
    was acknowledged, so the proxy replays it on a fresh connection: every message is accepted
    and delivered exactly once."""
    with PipeliningSink(drop_on_reuse=True) as backend:
        proxy = make_proxy(backend.address, backend_max_connections="1")
        with proxy.client() as client:
            client.sendmail("a@b.test", ["u@example.test"], numbered(1))
            client.sendmail("a@b.test", ["u@example.test"], numbered(2))
        with proxy.client() as other:
            other.sendmail("a@b.test", ["u@example.test"], numbered(3))
        assert wait_for(lambda: len(backend.messages) == 3)
        assert delivered_numbers(backend) == [1, 2, 3]


# -- 10. NUL in the body -------------------------------------------------------------------------


@pytest.mark.parametrize("bad_line", [b"\x00.", b"before\x00after"], ids=["nul-dot-line", "nul-mid-line"])
def test_nul_in_the_body_refuses_the_message_and_the_session_goes_on(make_proxy, bad_line: bytes) -> None:
    """A lenient backend that strips NUL would read "\\x00." as the end of data: a smuggling
    vector. The message is refused at its end; nothing of it is delivered."""
    with PipeliningSink() as backend:
        proxy = make_proxy(backend.address)
        client = start_message(proxy.port)
        assert client.command(numbered(1) + bad_line + b"\r\nmore\r\n.\r\n") == r.BODY_NUL.encode()
        assert deliver(client, 2).startswith(b"250")
        assert client.command(b"QUIT\r\n") == r.CLOSING.encode()
        client.close()
        assert wait_for(lambda: len(backend.messages) >= 1)
        assert delivered_numbers(backend) == [2]
        assert not any(b"\x00" in message.data for message in backend.messages)


# -- 11. DATA before MAIL ------------------------------------------------------------------------


def test_data_before_mail_says_so(make_proxy, sink) -> None:
    proxy = make_proxy(sink.address)
    reply = raw_session(proxy.port, b"EHLO c\r\nDATA\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nDATA\r\nQUIT\r\n")
    replies = replies_in(reply)
    assert replies[1:] == [r.NEED_MAIL_BEFORE_DATA.encode(), r.SENDER_OK.encode(), r.RESET_OK.encode(),
                           r.NEED_MAIL_BEFORE_DATA.encode(), r.CLOSING.encode()]



# -- found by the hostile bench: a NOOP loop ---------------------------------------------------


def test_noop_loop_past_the_junk_command_limit_is_disconnected(make_proxy, sink) -> None:
    """Postfix's smtpd_junk_command_limit: NOOPs past the limit are still answered, but each
    counts as an error, so a client looping on them (reading or not) soon gets 421 and loses
    its slot instead of costing the worker CPU for as long as it likes."""
    proxy = make_proxy(sink.address, junk_command_limit="5", max_errors="3")
    reply = raw_session(proxy.port, b"EHLO c\r\n" + b"NOOP\r\n" * 20)
    assert reply_codes(reply) == [250] + [250] * 8 + [r.TOO_MANY_ERRORS.code]


def test_a_delivered_message_resets_the_junk_count(make_proxy, sink) -> None:
    """RSET between messages is how a sender keeps one connection for many: never an error
    while it delivers."""
    proxy = make_proxy(sink.address, junk_command_limit="2", max_errors="2")
    with proxy.client() as client:
        for number in range(5):
            for _ in range(2):
                assert client.rset()[0] == 250
            client.sendmail("a@b.test", ["u@example.test"], f"Subject: {number}\r\n\r\nx\r\n")
    assert wait_for(lambda: len(sink.messages) == 5)


# -- found while profiling: TCP_NODELAY is the loop's -------------------------------------------


def test_both_legs_of_a_session_have_tcp_nodelay(make_proxy, sink) -> None:
    """design.md §3: a proxy that writes a reply and waits for the peer must not meet Nagle's
    algorithm. Neither leg sets the option itself any more (both loops set it on every TCP
    transport), so this checks the sockets the proxy really holds, client side and backend side."""
    proxy = make_proxy(sink.address)
    client = Client(proxy.port)
    assert client.command(b"EHLO c\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<u@example.test>\r\n").startswith(b"250")  # a backend leg now
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def inspect() -> None:
        assert proxy.state is not None
        for session in proxy.state.sessions:
            seen.append(("client", _nodelay(session.transport)))
            connection = session.lease.connection if session.lease is not None else None
            if connection is not None:
                seen.append(("backend", _nodelay(connection._transport)))
        done.set()

    proxy.call(inspect)
    assert done.wait(5)
    client.close()
    assert seen == [("client", 1), ("backend", 1)], seen


def _nodelay(transport) -> int:
    return transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
