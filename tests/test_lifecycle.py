"""``edgeproxy serve`` as operators run it: a real process, signals, workers, the embedded sink."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.refusals import POLICY_DEFAULTS
from edgeproxy.smtp import replies as r
from tests.conftest import wait_for
from tests.test_proxy_attacks import Client, start_message
from tests.test_proxy_faults import closed_port, delivered_numbers, numbered

RELAY_DENIED = POLICY_DEFAULTS["RELAY_DENIED"]


def refusal_records(lines: list[dict]) -> list[dict]:
    records = []
    for line in lines:
        if line.get("event") == "refused":
            records.append(line)
        elif line.get("event") == "session":
            context = {key: value for key, value in line.items() if key not in ("event", "refused")}
            records += [{**context, "event": "refused", **run} for run in line.get("refused") or ()]
    return records


class ServeProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = closed_port()
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")},
            "EDGEPROXY_LISTEN": f"127.0.0.1:{self.port}",
            "EDGEPROXY_LOG_FORMAT": "json",
            "EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0",
            **env,
        }
        if os.environ.get("EDGEPROXY_NO_EXTENSIONS"):
            full_env["EDGEPROXY_NO_EXTENSIONS"] = os.environ["EDGEPROXY_NO_EXTENSIONS"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "serve"], env=full_env, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not wait_for(lambda: self.count("listening") >= int(env.get("EDGEPROXY_WORKERS", "1")), 20):
            self.stop()
            raise RuntimeError(f"edgeproxy serve did not start: {self.lines}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "unparsed", "text": line})

    def count(self, event: str) -> int:
        return sum(1 for line in self.lines if line.get("event") == event)

    def refusals(self) -> list[dict]:
        """Every refusal record, each with its line's context (time, session, client, HELO): most
        ride in their session's closing line, a busy session's overflow has lines of its own."""
        return refusal_records(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10)


@pytest.fixture
def serve() -> Iterator:
    started: list[ServeProcess] = []

    def start(**env: str) -> ServeProcess:
        process = ServeProcess({f"EDGEPROXY_{k.upper()}": v for k, v in env.items()})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def backend_env(sink) -> dict[str, str]:
    return {"backend": f"127.0.0.1:{sink.port}"}


def test_defaults_start_the_embedded_sink_and_refuse_relaying(serve, tmp_path: Path) -> None:
    proxy = serve(sink_dir=str(tmp_path))
    assert proxy.count("embedded_sink") == 1
    with proxy.client() as client:
        assert client.sendmail("a@b.test", ["user@example.test"], numbered(1)) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@b.test", ["user@elsewhere.test"], numbered(2))
    assert wait_for(lambda: len(list(tmp_path.glob("*.eml"))) == 1)
    stored = next(tmp_path.glob("*.eml")).read_bytes()
    assert b"X-Sink-Rcpt-To: <user@example.test>" in stored and b"Subject: message 1" in stored
    assert wait_for(lambda: proxy.refusals())
    (refusal,) = proxy.refusals()
    # RFC 2505 §2.4: time, rule, client, HELO, sender, recipient domain.
    assert refusal["rule"] == "relay_denied" and refusal["client"] == "127.0.0.1"
    assert refusal["sender"] == "a@b.test" and refusal["recipient_domain"] == "elsewhere.test"
    assert "timestamp" in refusal and "helo" in refusal
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


def test_sigterm_drains_idle_sessions_and_finishes_transactions_in_flight(serve, sink) -> None:
    proxy = serve(**backend_env(sink), drain_timeout="10")
    idle = Client(proxy.port)
    assert idle.command(b"EHLO idle.test\r\n").startswith(b"250")
    busy = start_message(proxy.port)
    busy.sock.sendall(numbered(1)[:20])
    time.sleep(0.2)
    proxy.signal(signal.SIGTERM)
    assert idle.read_reply() == r.SHUTTING_DOWN.encode()
    busy.sock.sendall(numbered(1)[20:] + b".\r\n")
    assert busy.read_reply().startswith(b"250")
    assert busy.read_reply() == r.SHUTTING_DOWN.encode()
    assert proxy.wait() == 0
    assert delivered_numbers(sink) == [1]


def test_second_signal_exits_at_once(serve, sink) -> None:
    proxy = serve(**backend_env(sink), drain_timeout="30")
    busy = start_message(proxy.port)
    proxy.signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert time.monotonic() - started < 5
    busy.close()
    assert sink.messages == []


def test_sighup_reloads_lists_and_a_bad_file_keeps_the_old_policy(serve, sink, tmp_path: Path) -> None:
    domains = tmp_path / "domains"
    domains.write_text("example.test\n")
    proxy = serve(**backend_env(sink), local_domains=f"@{domains}")

    def rcpt(address: str) -> int:
        with proxy.client() as client:
            client.ehlo("c")
            client.mail("a@b.test")
            return client.rcpt(address)[0]

    assert rcpt("u@other.test") == RELAY_DENIED.code
    domains.write_text("example.test\nother.test  # added\n")
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: proxy.count("reloaded") == 1)
    assert rcpt("u@other.test") == 250
    domains.write_text("example.test\nnot a domain!\n")
    proxy.signal(signal.SIGHUP)
    assert wait_for(lambda: proxy.count("reload_failed") == 1)
    assert rcpt("u@other.test") == 250
    failure = next(line for line in proxy.lines if line.get("event") == "reload_failed")
    assert "EDGEPROXY_LOCAL_DOMAINS" in failure["problems"][0]


def test_sighup_under_load_loses_and_doubles_nothing(serve, sink, tmp_path: Path) -> None:
    recipients = tmp_path / "recipients"
    recipients.write_text("".join(f"user{n}@example.test\n" for n in range(2000)))
    proxy = serve(**backend_env(sink), recipients=f"@{recipients}")
    accepted: list[int] = []
    done = threading.Event()

    def deliver() -> None:
        with proxy.client() as client:
            for number in range(60):
                client.sendmail("a@b.test", [f"user{number}@example.test"], numbered(number))
                accepted.append(number)
        done.set()

    worker = threading.Thread(target=deliver)
    worker.start()
    for _ in range(5):
        time.sleep(0.05)
        proxy.signal(signal.SIGHUP)
    worker.join(60)
    assert done.is_set()
    assert wait_for(lambda: proxy.count("reloaded") == 5)
    assert wait_for(lambda: len(sink.messages) == len(accepted))
    assert delivered_numbers(sink) == accepted == list(range(60))


def test_workers_share_the_port(serve, sink) -> None:
    proxy = serve(**backend_env(sink), workers="2")
    pids = {line["pid"] for line in proxy.lines if line.get("event") == "listening"}
    assert len(pids) == 2
    for number in range(10):
        with proxy.client() as client:
            client.sendmail("a@b.test", ["u@example.test"], numbered(number))
    assert wait_for(lambda: len(sink.messages) == 10)
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


def test_bad_configuration_stops_start_up_naming_the_variable() -> None:
    env = {**os.environ, "EDGEPROXY_RELAY_ALLOW": "10.0.0.0/33", "EDGEPROXY_WORKERS": "many"}
    result = subprocess.run([sys.executable, "-m", "edgeproxy", "serve"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any("EDGEPROXY_RELAY_ALLOW='10.0.0.0/33'" in line for line in lines)
    assert any("EDGEPROXY_WORKERS='many'" in line for line in lines)
