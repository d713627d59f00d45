"""The servers a benchmark (or a test) starts on loopback, each on a free high port.

Every class is a context manager that starts its server, waits (bounded) for its greeting, and
stops everything it started on exit. ``pids()`` lists the processes whose CPU and memory count
as that server's.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def wait_for_greeting(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None,
                      log: Path | None = None) -> None:
    """Until something greets on ``port``; fails at once, with its log's tail, if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before greeting"
                               + (f":\n{tail}" if tail else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"nothing greets on 127.0.0.1:{port} after {timeout} s" + (f"; its log ends:\n{tail}" if tail
                                                                                   else ""))


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

    def __init__(self, max_sessions: int | None = None) -> None:
        super().__init__()
        self.dump = self.root / "dump"
        self.dump.mkdir()
        self.native = Path(SMTP_SINK).exists()
        # smtp-sink serves at most this many sessions at once (-m, its default 256); further
        # connections wait, accepted by the kernel, in the listen backlog.
        self.max_sessions = max_sessions

    def start(self) -> SmtpSink:
        if self.native:
            # smtp-sink drops to "nobody", which must reach the dump directory to write to it.
            self.root.chmod(0o755)
            self.dump.chmod(0o777)
            limit = ["-m", str(self.max_sessions)] if self.max_sessions else []
            command = [SMTP_SINK, "-u", "nobody", *limit, "-d", f"{self.dump}/%H%M%S.", f"127.0.0.1:{self.port}",
                       "4096"]
        else:
            if self.max_sessions:
                raise RuntimeError("a backend limited in sessions needs Postfix's smtp-sink")
            command = [sys.executable, "-m", "edgeproxy", "sink", "--listen", f"127.0.0.1:{self.port}",
                       "--dir", str(self.dump)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port, process=self.process)
        return self

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in self.dump.rglob("*") if path.is_file() and not path.name.startswith(".")]


class SlowSink(SmtpSink):
    """``bench/slowsink.py``: a sink that answers RCPT to ``held…@`` recipients only after ``delay``
    seconds and every other command at once (smtp-sink's ``-W rcpt:delay`` would delay every
    recipient, the normal clients' too). The ``held-input`` scenario's backend."""

    name = "slowsink"

    def __init__(self, delay: float, max_sessions: int | None = None, prefix: str = "held") -> None:
        super().__init__(max_sessions)
        self.delay = delay
        self.prefix = prefix
        self.native = False

    def start(self) -> SlowSink:
        command = [sys.executable, str(Path(__file__).with_name("slowsink.py")), "--listen", f"127.0.0.1:{self.port}",
                   "--dir", str(self.dump), "--delay", str(self.delay), "--prefix", self.prefix]
        if self.max_sessions:
            command += ["--max-sessions", str(self.max_sessions)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_greeting(self.port, process=self.process)
        return self


def make_certificate(directory: Path, key_type: str = "ec") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for ``mx.bench.test`` and its key, made now in
    ``directory`` (never checked in): ``ec`` (P-256, ECDSA) or ``rsa`` (2048 bits)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    if key_type == "ec":
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unknown key type {key_type!r}: ec or rsa")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.bench.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.bench.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "bench-cert.pem", directory / "bench-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path


PROBE = """
import json
import sys
import edgeproxy
found = {"file": edgeproxy.__file__, "variables": None, "fastpath": "?"}
try:
    from edgeproxy.config import VARIABLES
    found["variables"] = [variable.env for variable in VARIABLES]
except Exception as error:
    found["why"] = repr(error)
try:
    from edgeproxy import fastpath
    found["fastpath"] = fastpath.IMPLEMENTATION
except Exception as error:
    found["fastpath"] = repr(error)
found["modules"] = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                    if name == "edgeproxy" or name.startswith("edgeproxy.")}
print(json.dumps(found))
"""
REQUIRED = ("EDGEPROXY_LISTEN", "EDGEPROXY_BACKEND")


@dataclass(frozen=True)
class EdgeproxyBuild:
    """Which edgeproxy code a system runs: the installed package (``source`` None), or a source
    checkout run as ``PYTHONPATH=source python -m edgeproxy serve`` from inside it (so neither the
    installed package nor the current directory's can shadow it). A checkout needs its extension
    built in place (``python setup.py build_ext --inplace``), else it runs the pure-Python twin."""

    name: str = "edgeproxy"
    source: Path | None = None
    settings: tuple[tuple[str, str], ...] = ()  # a variant's EDGEPROXY_* over the bench's own

    def __post_init__(self) -> None:
        if self.source is not None and not (self.source / "edgeproxy" / "__main__.py").is_file():
            raise ValueError(f"{self.source}: no edgeproxy/__main__.py there, not an edgeproxy checkout")

    def environment(self) -> tuple[dict[str, str], str | None]:
        """The environment (no EDGEPROXY_* but NO_EXTENSIONS inherited) and working directory."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
        if os.environ.get("EDGEPROXY_NO_EXTENSIONS"):
            clean["EDGEPROXY_NO_EXTENSIONS"] = os.environ["EDGEPROXY_NO_EXTENSIONS"]
        if self.source is None:
            return clean, None
        clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.source), clean.get("PYTHONPATH")]))
        return clean, str(self.source)

    @functools.cached_property
    def probe(self) -> dict[str, object]:
        """Where its code is imported from, its ``config.VARIABLES`` names and its fast path."""
        env, cwd = self.environment()
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: cannot import edgeproxy: {done.stderr[-2000:]}")
        found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        if self.source is not None:
            # An editable install's import hook serves any edgeproxy module the checkout lacks
            # (typically the compiled extension, not built there) from the installed package.
            modules: dict[str, str | None] = found["modules"]  # type: ignore[assignment]
            foreign = {name: file for name, file in modules.items()
                       if file and not Path(file).resolve().is_relative_to(self.source.resolve())}
            if foreign:
                listed = ", ".join(f"{name} from {file}" for name, file in sorted(foreign.items()))
                raise RuntimeError(f"{self.name}: imports {listed}, not from {self.source} (is its extension "
                                   f"built in place? cd {self.source} && python setup.py build_ext --inplace)")
        return found

    @functools.cache  # noqa: B019 - a handful of builds, alive for the whole run
    def knows(self, name: str, value: str) -> bool:
        """Whether this build's configuration has the variable ``name``: from its VARIABLES
        table, else by whether ``edgeproxy config`` with it set exits 0."""
        names = self.probe["variables"]
        if isinstance(names, list):
            return name in names
        env, cwd = self.environment()
        env.update({"EDGEPROXY_LISTEN": "127.0.0.1:2525", "EDGEPROXY_BACKEND": "127.0.0.1:2526", name: value})
        done = subprocess.run([sys.executable, "-m", "edgeproxy", "config"], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=60)
        return done.returncode == 0

    def describe(self) -> dict[str, object]:
        commit = ""
        source = self.source or Path(str(self.probe["file"])).parent.parent
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)  # read-only: never refreshes the index
        if done.returncode == 0:
            commit = done.stdout.strip()
        return {"system": self.name, "source": str(self.source) if self.source else "installed package",
                "imports": self.probe["file"], "commit": commit, "fastpath": self.probe["fastpath"]}


class EdgeproxyServer(Server):
    """``edgeproxy serve`` in front of ``backend``. ``settings`` maps EDGEPROXY_* names to values;
    those the build does not know are left out (its configuration refuses unknown names) and
    listed in ``skipped``."""

    name = "edgeproxy"

    def __init__(self, backend: tuple[str, int], workers: int = 1, build: EdgeproxyBuild | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.build = build or EdgeproxyBuild()
        self.name = self.build.name
        super().__init__()
        wanted = {
            "EDGEPROXY_LISTEN": f"127.0.0.1:{self.port}",
            "EDGEPROXY_BACKEND": f"{backend[0]}:{backend[1]}",
            "EDGEPROXY_WORKERS": str(workers),
            **(settings or {}),
        }
        self.env = {name: value for name, value in wanted.items() if self.build.knows(name, value)}
        self.skipped = sorted(set(wanted) - set(self.env))
        missing = [name for name in REQUIRED if name in self.skipped]
        if missing:
            raise RuntimeError(f"{self.name} does not know {', '.join(missing)}")

    def start(self) -> EdgeproxyServer:
        env, cwd = self.build.environment()
        log = self.root / "log"
        self.process = subprocess.Popen([sys.executable, "-m", "edgeproxy", "serve"], env={**env, **self.env},
                                        cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
        wait_for_greeting(self.port, process=self.process, log=log)
        return self

    def log_text(self) -> str:
        log = self.root / "log"
        return log.read_text(errors="replace") if log.exists() else ""


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
        wait_for_greeting(self.port, process=self.process)
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
    before-queue to the sink (``smtpd_proxy_filter``): the same job, done by Postfix.

    No client name lookup (``smtpd_peername_lookup = no``), as edgeproxy does none: the load
    comes from 127.1.x.y, which no hosts file names, so each session would ask the machine's DNS
    for its PTR, and a lost query stalls that session for the resolver's 5 s timeout."""

    def __init__(self, sink: tuple[str, int], domain: str = "example.test",
                 tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(
            f"relay_domains = {domain}\nmynetworks = 127.255.255.255/32\n"
            "smtpd_relay_restrictions = reject_unauth_destination\nsmtpd_peername_lookup = no\n"
            f"smtpd_proxy_filter = {sink[0]}:{sink[1]}\nsmtpd_proxy_options = speed_adjust\n"
            "smtpd_hard_error_limit = 1000\nsmtpd_client_connection_count_limit = 0\n"
            "default_process_limit = 200\n"
            + (postfix_tls(*tls) if tls else "")
        )


def postfix_tls(cert: Path, key: Path) -> str:
    """STARTTLS offered (not required) with ``cert``; TLS 1.3 tickets from tlsmgr's keys, which
    every smtpd process shares (``smtpd_tls_session_cache_timeout``, default 3600 s, > 0), and a
    server-side cache for TLS 1.2 session IDs."""
    return (f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\nsmtpd_tls_security_level = may\n"
            "smtpd_tls_loglevel = 0\nsmtpd_tls_received_header = no\n"
            "smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache\n")


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
