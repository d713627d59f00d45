"""deploy/haproxy.cfg, exactly as shipped, in front of two ``edgeproxy serve`` processes and a
real SMTP sink, all on loopback: the many-nodes topology of design.md §8 as an operator builds it.

Loopback has a whole /8, so clients take distinct source addresses: HAProxy connects from
127.0.0.1 (the only address the instances accept PROXY headers from), 127.0.0.2 may relay,
127.0.0.3 may not, 127.0.0.4 is the load generator. Each test starts its own topology and takes a
few seconds; every process is stopped whatever happens.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from tests.backends import AiosmtpdSink
from tests.conftest import require_tool, wait_for
from tests.test_lifecycle import ServeProcess
from tests.test_proxy_faults import closed_port, delivered_numbers, numbered
from tests.test_proxy_protocol import v1, v2
from tests.test_proxy_robustness import read_to_end

HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
BALANCER = "127.0.0.1"
RELAY_CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
LOAD_CLIENT = "127.0.0.4"
CHECK_HELO = "healthcheck.invalid"  # haproxy.cfg's `option smtpchk EHLO ...`
RELAY_DENIED = POLICY_DEFAULTS["RELAY_DENIED"]
PROXY_TIMEOUT = 2.0


class HAProxy:
    """``haproxy -f deploy/haproxy.cfg`` in the foreground, its addresses from the environment."""

    def __init__(self, edges: list[str]) -> None:
        binary = require_tool("haproxy")
        self.port = closed_port()
        self.stats_port = closed_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("SMTP_LB_")}
        env.update({"SMTP_LB_BIND": f"127.0.0.1:{self.port}", "SMTP_LB_EDGE1": edges[0],
                    "SMTP_LB_EDGE2": edges[1], "SMTP_LB_STATS": f"127.0.0.1:{self.stats_port}"})
        self.process = subprocess.Popen([binary, "-f", str(HAPROXY_CFG)], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if not wait_for(lambda: self.process.poll() is not None or self._stats_up(), 10) or self.process.poll():
            self.stop()
            raise RuntimeError(f"haproxy did not start: {self.lines}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _stats_up(self) -> bool:
        try:
            self.servers()
        except OSError:
            return False
        return True

    def servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's own view of each instance (its stats page as CSV), by server name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5) as response:
            text = response.read().decode().removeprefix("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == "edgeproxy" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Topology:
    sink: AiosmtpdSink
    edges: list[ServeProcess]
    haproxy: HAProxy

    def client(self, source: str) -> smtplib.SMTP:
        """An SMTP client from ``source`` through HAProxy."""
        return smtplib.SMTP("127.0.0.1", self.haproxy.port, timeout=10, source_address=(source, 0))

    def refusals(self, **fields: object) -> list[dict]:
        return [record for edge in self.edges for record in edge.refusals()
                if all(record.get(key) == value for key, value in fields.items())]

    def log_lines(self, **fields: object) -> list[dict]:
        return [line for edge in self.edges for line in edge.lines
                if all(line.get(key) == value for key, value in fields.items())]


def edge_env(number: int, sink: AiosmtpdSink, cert: str, key: str) -> dict[str, str]:
    return {
        "EDGEPROXY_BACKEND": f"127.0.0.1:{sink.port}",
        "EDGEPROXY_HOSTNAME": f"edge{number}.test",  # names the instance in each Received: header
        "EDGEPROXY_PROXY_PROTOCOL_FROM": f"{BALANCER}/32",
        "EDGEPROXY_PROXY_PROTOCOL_TIMEOUT": str(PROXY_TIMEOUT),
        "EDGEPROXY_RELAY_ALLOW": f"{RELAY_CLIENT}/32",
        "EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0",
        "EDGEPROXY_METRICS_LISTEN": f"127.0.0.1:{closed_port()}",
        # A pair, as in production: without one the instance warns at start (starttls_not_offered),
        # and test (d) wants a log with nothing above info.
        "EDGEPROXY_TLS_CERT": cert,
        "EDGEPROXY_TLS_KEY": key,
        "EDGEPROXY_DRAIN_TIMEOUT": "10",
    }


@pytest.fixture
def topology(sink: AiosmtpdSink, tmp_path: Path) -> Iterator[Topology]:
    import trustme

    require_tool("haproxy")
    issued = trustme.CA().issue_cert("edge1.test", "edge2.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    edges: list[ServeProcess] = []
    haproxy: HAProxy | None = None
    try:
        for number in (1, 2):
            edges.append(ServeProcess(edge_env(number, sink, str(cert), str(key))))
        haproxy = HAProxy([f"127.0.0.1:{edge.port}" for edge in edges])
        # Both instances have passed a health check before any test traffic.
        assert wait_for(lambda: all(row["check_status"] == "L7OK" for row in haproxy.servers().values()), 10), (
            haproxy.servers(), haproxy.lines)
        yield Topology(sink, edges, haproxy)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for edge in edges:
            stop_tree(edge)


def stop_tree(edge: ServeProcess) -> None:
    """Kill an instance and every process it forked (workers, the metrics process): killing the
    supervisor alone would leave them running, orphaned, holding their ports."""
    try:
        children = psutil.Process(edge.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    edge.stop()  # first, so that it cannot fork replacements for the children killed next
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    # Dead once a zombie (its sockets are closed by then); reaping is init's business.
    wait_for(lambda: all(_gone(child) for child in children), 5)


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe_tree(edge: ServeProcess) -> list[str]:
    try:
        processes = [psutil.Process(edge.process.pid), *psutil.Process(edge.process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [f"{process.pid} {process.status()} cpu={sum(process.cpu_times()[:2]):.1f}s" for process in processes]


# -- (a) the policy is about the client, not the balancer ---------------------------------------


def test_relay_policy_applies_to_the_client_behind_haproxy(topology: Topology) -> None:
    with topology.client(RELAY_CLIENT) as client:
        assert client.sendmail("a@sender.test", ["user@elsewhere.test"], numbered(1)) == {}
    with topology.client(OTHER_CLIENT) as client:
        client.ehlo("other.test")
        assert client.mail("b@sender.test")[0] == 250
        assert client.rcpt("user@elsewhere.test")[0] == RELAY_DENIED.code
        # Refused for relaying, not for anything else: its local mail goes through.
        assert client.rcpt("user@example.test")[0] == 250
        assert client.data(numbered(2))[0] == 250
    assert wait_for(lambda: len(topology.sink.messages) == 2)
    assert delivered_numbers(topology.sink) == [1, 2]
    by_number = {int(message.data.split(b"Subject: message ")[1].split(b"\r\n")[0]): message
                 for message in topology.sink.messages}
    assert by_number[1].rcpt_tos == ["user@elsewhere.test"] and by_number[2].rcpt_tos == ["user@example.test"]
    # The Received: header names the real client, as the backend's own checks will read it.
    assert f"([{RELAY_CLIENT}])".encode() in by_number[1].data
    assert f"([{OTHER_CLIENT}])".encode() in by_number[2].data
    assert wait_for(lambda: topology.refusals(rule="relay_denied"))
    (refusal,) = topology.refusals(rule="relay_denied")
    assert refusal["client"] == OTHER_CLIENT and refusal["via"] == BALANCER


# -- (b) a PROXY header is believed from the balancer only ----------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_from_an_untrusted_source_is_refused(topology: Topology, version: int) -> None:
    edge = topology.edges[0]
    # It claims to come from the relay client, then tries to relay at once.
    header = (v1 if version == 1 else v2)(RELAY_CLIENT, destination="127.0.0.1")
    attempt = (b"EHLO spoof.test\r\nMAIL FROM:<a@spoof.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
               + numbered(99) + b".\r\n")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5, source_address=(OTHER_CLIENT, 0)) as sock:
        sock.sendall(header + attempt)
        received = read_to_end(sock, 5)
    # An address outside PROXY_PROTOCOL_FROM is greeted as any client, at once, before its first
    # bytes arrive; the header then ends the connection, with no reply to anything after it.
    assert all(line.startswith(b"220") for line in received.split(b"\r\n") if line), received
    assert wait_for(lambda: topology.log_lines(event="refused", rule="proxy_header_untrusted", client=OTHER_CLIENT))
    time.sleep(0.3)
    assert topology.sink.messages == []
    assert not topology.log_lines(client=RELAY_CLIENT)  # the claimed address was never taken


def test_balancer_gets_no_greeting_before_its_header(topology: Topology) -> None:
    # From the trusted address the client is whoever the header names: nothing is said to a
    # connection that has not sent it, and it is closed when PROXY_PROTOCOL_TIMEOUT runs out.
    edge = topology.edges[1]
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5, source_address=(BALANCER, 0)) as sock:
        started = time.monotonic()
        received = read_to_end(sock, PROXY_TIMEOUT + 5)
        elapsed = time.monotonic() - started
    assert received == b""
    assert PROXY_TIMEOUT - 0.2 <= elapsed < PROXY_TIMEOUT + 3
    assert wait_for(lambda: topology.log_lines(event="refused", rule="proxy_header_timeout"))


# -- (c) one instance drains, the other carries on, nothing is lost or doubled ----------------


def test_one_instance_drains_under_load_and_no_acknowledged_message_is_lost(topology: Topology) -> None:
    sink, (first, second) = topology.sink, topology.edges
    counter = itertools.count(1)
    lock = threading.Lock()
    attempted: list[int] = []
    acknowledged: dict[int, float] = {}  # number -> when the 250 after DATA arrived
    stop = threading.Event()

    def load() -> None:
        client: smtplib.SMTP | None = None
        while not stop.is_set():
            with lock:
                number = next(counter)
                attempted.append(number)
            try:
                if client is None:
                    client = topology.client(LOAD_CLIENT)
                client.sendmail("load@sender.test", ["user@example.test"], numbered(number))
            except (smtplib.SMTPException, OSError):
                # A 421 from the draining instance, or a connection it closed: a new connection,
                # which HAProxy sends elsewhere. The number is not reused: an unacknowledged
                # message must not be counted as the next one's delivery.
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.02)
                continue
            with lock:
                acknowledged[number] = time.monotonic()
        if client is not None:
            client.close()

    def delivered_by(name: bytes) -> int:
        return sum(1 for message in list(sink.messages) if b"by " + name + b" (edgeproxy)" in message.data)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        # Mid-load: the first instance is carrying part of it when it is told to stop.
        assert wait_for(lambda: delivered_by(b"edge1.test") >= 5 and delivered_by(b"edge2.test") >= 5, 10)
        first.signal(signal.SIGTERM)
        # The worker's drain (10 s at most here): from then on the instance serves nobody.
        assert wait_for(lambda: first.count("stopped") == 1, 15), first.lines[-5:]
        # (A second's margin: a client thread may note the time of edge1's last 250 a little
        # after edge1 logged "stopped", on a loaded machine.)
        stopped = time.monotonic() + 1.0
        assert wait_for(lambda: sum(1 for at in list(acknowledged.values()) if at > stopped) >= 20, 10)
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
    assert not any(worker.is_alive() for worker in workers)
    assert first.count("draining") == 1 and first.count("stopped") == 1
    assert first.count("drain_deadline") == 0  # every transaction in flight finished
    assert second.process.poll() is None

    assert wait_for(lambda: len(sink.messages) >= len(acknowledged), 10)
    time.sleep(0.5)  # anything still arriving would be a message nobody was told about
    delivered = delivered_numbers(sink)
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert set(acknowledged) <= set(delivered), f"acknowledged but lost: {set(acknowledged) - set(delivered)}"
    assert set(delivered) <= set(attempted)
    # A graceful drain on loopback leaves no window where a message is delivered but its 250 is
    # lost: every delivery was acknowledged.
    assert sorted(acknowledged) == delivered
    after = [message for message in sink.messages
             if acknowledged[int(message.data.split(b"Subject: message ")[1].split(b"\r\n")[0])] > stopped]
    assert after and all(b"by edge2.test (edgeproxy)" in message.data for message in after)
    # And the instance as a whole is gone, metrics process included, as systemd and the kubelet
    # expect of a SIGTERM well before their SIGKILL.
    assert wait_for(lambda: first.process.poll() is not None, 5), (
        f"still running after its drain: {describe_tree(first)}")
    assert first.process.returncode == 0


# -- (d) the health checks ------------------------------------------------------------------------


def test_haproxy_health_checks_reach_the_instances_cleanly(topology: Topology) -> None:
    def checks(edge: ServeProcess) -> list[dict]:
        return [line for line in edge.lines if line.get("event") == "session" and line.get("helo") == CHECK_HELO]

    # option smtpchk: greeting, EHLO, QUIT, at least twice on each instance (inter 2s).
    for edge in topology.edges:
        assert wait_for(lambda edge=edge: len(checks(edge)) >= 2, 10), edge.lines
        for check in checks(edge):
            # The check's PROXY v2 LOCAL header: the balancer speaking for itself.
            assert check["client"] == BALANCER and "via" not in check
            assert check["errors"] == 0 and check["refusals"] == 0 and check["messages"] == 0
    for name, row in topology.haproxy.servers().items():
        assert row["status"] == "UP" and row["check_status"] == "L7OK", (name, row)
        assert row["chkfail"] == "0" and row["chkdown"] == "0", (name, row)
    for edge in topology.edges:
        loud = [line for line in edge.lines if line.get("level") not in ("debug", "info")]
        assert not loud, loud
        assert not edge.refusals()
    assert not [line for line in topology.haproxy.lines if "DOWN" in line or "[ALERT]" in line or "[WARNING]" in line]
