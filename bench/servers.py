"""The servers a benchmark (or a test) starts on loopback, each on a free high port.

Every class is a context manager that starts its server, waits (bounded) for its greeting, and
stops everything it started on exit. ``pids()`` lists the processes whose CPU and memory count
as that server's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
MASTER_PROTO = Path("/etc/postfix/master.cf.proto")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_greeting(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing greets on 127.0.0.1:{port} after {timeout} s")


def process_tree(pids: list[int]) -> list[psutil.Process]:
    processes = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            processes.append(parent)
            processes.extend(parent.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return processes


class Server:
    name = "server"
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"edgeproxy-bench-{self.name}-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def start(self) -> Server:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SmtpSink(Server):
    """Postfix's C smtp-sink when installed (never the bottleneck), else ``edgeproxy sink``.
    Every message is dumped to a file, so a run can count what arrived."""

    name = "sink"

    def __init__(self) -> None:
        super().__init__()
        self.dump = self.root / "dump"
        self.dump.mkdir()
        self.native = Path(SMTP_SINK).exists()

    def start(self) -> SmtpSink:
        if self.native:
            # smtp-sink drops to "nobody", which must reach the dump directory to write to it.
            self.root.chmod(0o755)
            self.dump.chmod(0o777)
            command = [SMTP_SINK, "-u", "nobody", "-d", f"{self.dump}/%H%M%S.", f"127.0.0.1:{self.port}", "4096"]
        else:
            command = [sys.executable, "-m", "edgeproxy", "sink", "--listen", f"127.0.0.1:{self.port}",
                       "--dir", str(self.dump)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port)
        return self

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in self.dump.rglob("*") if path.is_file() and not path.name.startswith(".")]


class EdgeproxyServer(Server):
    name = "edgeproxy"

    def __init__(self, backend: tuple[str, int], workers: int = 1, **env: str) -> None:
        super().__init__()
        self.env = {
            "EDGEPROXY_LISTEN": f"127.0.0.1:{self.port}",
            "EDGEPROXY_BACKEND": f"{backend[0]}:{backend[1]}",
            "EDGEPROXY_LOCAL_DOMAINS": "example.test",
            "EDGEPROXY_WORKERS": str(workers),
            "EDGEPROXY_MAX_CONNECTIONS": "30000",
            "EDGEPROXY_MAX_CONNECTIONS_PER_IP": "0",
            "EDGEPROXY_MAX_ERRORS": "1000",
            "EDGEPROXY_LOG_LEVEL": "warning",
            **{f"EDGEPROXY_{key.upper()}": value for key, value in env.items()},
        }

    def start(self) -> EdgeproxyServer:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
        if os.environ.get("EDGEPROXY_NO_EXTENSIONS"):
            clean["EDGEPROXY_NO_EXTENSIONS"] = os.environ["EDGEPROXY_NO_EXTENSIONS"]
        self.process = subprocess.Popen([sys.executable, "-m", "edgeproxy", "serve"], env={**clean, **self.env},
                                        stdout=subprocess.DEVNULL, stderr=open(self.root / "log", "wb"))  # noqa: SIM115
        wait_for_greeting(self.port)
        return self


class HaproxyTcp(Server):
    """HAProxy in TCP mode in front of the sink: what any pure L4 hop costs."""

    name = "haproxy"

    def __init__(self, backend: tuple[str, int]) -> None:
        super().__init__()
        self.backend = backend

    def start(self) -> HaproxyTcp:
        config = self.root / "haproxy.cfg"
        config.write_text(
            "global\n  maxconn 9000\n  nbthread 1\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend smtp\n  bind 127.0.0.1:{self.port}\n  default_backend sink\n"
            f"backend sink\n  server sink {self.backend[0]}:{self.backend[1]}\n"
        )
        self.process = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port)
        return self


class PrivatePostfix(Server):
    """A private Postfix instance: own config, queue and data directories, smtpd on a high
    loopback port, never port 25 nor the system's instance. ``main_cf`` adds settings."""

    name = "postfix"

    def __init__(self, main_cf: str) -> None:
        super().__init__()
        self.config = self.root / "etc"
        self.log = self.root / "maillog"
        self.main_cf = main_cf

    @staticmethod
    def available() -> bool:
        return Path(POSTFIX).exists() and MASTER_PROTO.exists()

    def start(self) -> PrivatePostfix:
        for name in ("etc", "queue", "data", "mail"):
            (self.root / name).mkdir()
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix", "postfix")
        shutil.chown(self.root / "mail", "nobody", "nogroup")
        (self.config / "main.cf").write_text(
            f"compatibility_level = 3.6\nqueue_directory = {self.root}/queue\ndata_directory = {self.root}/data\n"
            "mail_owner = postfix\nsetgid_group = postdrop\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
            "myhostname = backend.test\nmydestination =\nalias_maps =\nalias_database =\n"
            f"maillog_file = {self.log}\nmaillog_file_prefixes = {self.root}\n" + self.main_cf
        )
        master = MASTER_PROTO.read_text().replace(
            "smtp      inet  n       -       y       -       -       smtpd", f"{self.port} inet n - n - - smtpd"
        )
        if f"{self.port} inet" not in master:
            raise RuntimeError("master.cf.proto has an unexpected smtpd line")
        (self.config / "master.cf").write_text(master)
        subprocess.run([POSTFIX, "-c", str(self.config), "start"], check=True, capture_output=True, timeout=60)
        wait_for_greeting(self.port)
        return self

    def pids(self) -> list[int]:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        try:
            return [int(pid_file.read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    def stop(self) -> None:
        if self.config.exists():
            subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class PostfixRelayPolicy(PrivatePostfix):
    """Postfix's smtpd with the same relay policy as edgeproxy, passing accepted mail
    before-queue to the sink (``smtpd_proxy_filter``): the same job, done by Postfix."""

    def __init__(self, sink: tuple[str, int], domain: str = "example.test") -> None:
        super().__init__(
            f"relay_domains = {domain}\nmynetworks = 127.255.255.255/32\n"
            "smtpd_relay_restrictions = reject_unauth_destination\n"
            f"smtpd_proxy_filter = {sink[0]}:{sink[1]}\nsmtpd_proxy_options = speed_adjust\n"
            "smtpd_hard_error_limit = 1000\nsmtpd_client_connection_count_limit = 0\n"
            "default_process_limit = 200\n"
        )


class PostfixBackend(PrivatePostfix):
    """A real Postfix as edgeproxy's backend: accepts mail for ``domain`` into a Maildir and
    believes edgeproxy's XCLIENT."""

    def __init__(self, domain: str = "example.test") -> None:
        super().__init__(
            f"mynetworks = 127.0.0.0/8\nvirtual_mailbox_domains = {domain}\n"
            "virtual_mailbox_base = {root}/mail\nvirtual_mailbox_maps = static:inbox/\n"
            "virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\n"
            "smtpd_authorized_xclient_hosts = 127.0.0.0/8\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
        )
        self.main_cf = self.main_cf.replace("{root}", str(self.root))
        self.maildir = self.root / "mail" / "inbox"

    def messages(self) -> list[bytes]:
        directory = self.maildir / "new"
        return [path.read_bytes() for path in sorted(directory.glob("*"))] if directory.exists() else []

    def wait_for_messages(self, count: int, timeout: float = 20) -> list[bytes]:
        """Postfix delivers after queueing: wait, bounded, until ``count`` messages are in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages()) < count:
            time.sleep(0.05)
        return self.messages()
