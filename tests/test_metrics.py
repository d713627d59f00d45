"""Prometheus metrics and health endpoints of a real ``edgeproxy serve`` (design.md §8): counts
summed over the workers, in the official text format, and /healthz and /readyz that follow
the backend and a drain."""

from __future__ import annotations

import signal
import smtplib
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.metrics import backend_answers
from tests.backends import AiosmtpdSink
from tests.conftest import wait_for
from tests.test_lifecycle import ServeProcess
from tests.test_proxy_attacks import Client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(port: int, name: str, **labels: str) -> float:
    return samples(port).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered(logged_proxy, sink: AiosmtpdSink) -> Callable[..., tuple[ServeProcess, int]]:
    """A proxy process with metrics on, and the metrics port."""

    def start(backend: tuple[str, int] | None = None, **env: str) -> tuple[ServeProcess, int]:
        metrics_port = free_port()
        process = logged_proxy(backend or sink.address, metrics_listen=f"127.0.0.1:{metrics_port}", **env)
        assert wait_for(lambda: get(metrics_port, "/healthz")[0] == 200, 10)
        return process, metrics_port

    return start


def test_counts_are_summed_over_two_workers(metered, sink) -> None:
    node, port = metered(workers="2")
    for _ in range(20):  # relay attempts: refused at RCPT
        client = Client(node.port)
        assert client.command(b"EHLO c\r\n").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")
        assert client.command(b"RCPT TO:<victim@far-away.test>\r\n").startswith(b"554")
        assert client.command(b"QUIT\r\n").startswith(b"221")
        client.close()
    for number in range(5):
        with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
            client.sendmail("a@b.test", ["u@example.test"], f"Subject: {number}\r\n\r\nhello\r\n")
    assert wait_for(lambda: value(port, "edgeproxy_sessions_total") == 25, 10), samples(port)
    assert value(port, "edgeproxy_workers") == 2
    assert value(port, "edgeproxy_refusals_total", rule="relay_denied") == 20
    assert value(port, "edgeproxy_connections_accepted_total") == 25
    assert value(port, "edgeproxy_messages_total", outcome="delivered", reply_class="2xx") == 5
    assert value(port, "edgeproxy_recipients_accepted_total") == 5
    assert value(port, "edgeproxy_message_bytes_total") == 5 * len("Subject: 0\r\n\r\nhello\r\n")
    assert value(port, "edgeproxy_session_duration_seconds_count") == 25
    assert value(port, "edgeproxy_backend_transaction_seconds_count") == 5
    assert value(port, "edgeproxy_connections_open") == 0
    assert len(sink.messages) == 5


def test_refused_connections_are_counted_by_reason(metered) -> None:
    node, port = metered(max_connections_per_ip="1")
    held = Client(node.port)
    refused = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    assert refused.recv(1024).startswith(b"421")
    refused.close()
    assert wait_for(lambda: value(port, "edgeproxy_connections_refused_total", reason="too_many_connections") == 1,
                    5)
    assert wait_for(lambda: value(port, "edgeproxy_connections_open") == 1, 5)
    held.close()


def test_readyz_follows_the_backend(metered) -> None:
    with AiosmtpdSink() as backend:
        _, port = metered(backend=backend.address)
        assert wait_for(lambda: get(port, "/readyz") == (200, "ready\n"), 10)
    # The backend is gone: within the check interval, not ready (and still healthy).
    assert wait_for(lambda: get(port, "/readyz") == (503, "backend does not answer\n"), 10)
    assert get(port, "/healthz") == (200, "ok\n")


def test_readyz_fails_as_soon_as_a_drain_begins(metered) -> None:
    node, port = metered(drain_timeout="5")
    assert wait_for(lambda: get(port, "/readyz")[0] == 200, 10)
    client = Client(node.port)
    assert client.command(b"EHLO c\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@b.test>\r\n").startswith(b"250")  # in a transaction: the drain waits
    node.signal(signal.SIGTERM)
    assert wait_for(lambda: get(port, "/readyz") == (503, "draining\n"), 5)
    assert get(port, "/healthz")[0] == 200
    client.close()
    assert node.wait(20) == 0


def test_unknown_paths_are_404(metered) -> None:
    _, port = metered()
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/../etc/passwd")[0] == 404


def test_a_metrics_address_in_use_stops_start_up_with_one_line(sink) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError):
            ServeProcess({"EDGEPROXY_BACKEND": f"{sink.address[0]}:{sink.address[1]}",
                          "EDGEPROXY_METRICS_LISTEN": f"127.0.0.1:{port}"})


def test_backend_answers_wants_a_220(sink) -> None:
    assert backend_answers(sink.address)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert not backend_answers(silent.getsockname())  # accepts, never greets


def test_an_idle_node_with_metrics_on_uses_no_cpu(metered) -> None:
    """Found by the bench: the listening socket came non-blocking from the supervisor, so the
    metrics process's request loop spun at 100% of a core. Idle, the whole tree barely runs
    (a spinning loop would burn the whole 2 s)."""
    import time

    import psutil

    node, _ = metered()
    tree = [psutil.Process(node.process.pid), *psutil.Process(node.process.pid).children(recursive=True)]
    assert len(tree) == 3  # supervisor, metrics process, worker

    def used() -> float:
        return sum(sum(process.cpu_times()[:2]) for process in tree)

    before = used()
    time.sleep(2)
    assert used() - before < 0.5


def test_workers_and_the_metrics_process_end_when_the_supervisor_is_killed(metered) -> None:
    """SIGKILL (the OOM killer) forwards nothing: the workers drain and the metrics process
    exits on their own, instead of serving on unsupervised (found as orphans after test runs)."""
    import psutil

    node, _ = metered(workers="2")
    children = psutil.Process(node.process.pid).children(recursive=True)
    assert len(children) == 3
    node.process.kill()
    node.process.wait(10)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [child.pid for child in alive]
