"""A private Postfix instance on a high loopback port, as a real backend for the proxy.

Its own config, queue and data directories under a temporary directory; it delivers mail for
one domain into a Maildir there. It never touches port 25 or the system's instance.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
MASTER_PROTO = Path("/etc/postfix/master.cf.proto")


def available() -> bool:
    return Path(POSTFIX).exists() and MASTER_PROTO.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostfixBackend:
    def __init__(self, domain: str = "example.test") -> None:
        self.domain = domain
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgeproxy-postfix-"))
        self.config = self.root / "etc"
        self.maildir = self.root / "mail" / "inbox"
        self.log = self.root / "maillog"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _write_config(self) -> None:
        for name in ("etc", "queue", "data", "mail"):
            (self.root / name).mkdir()
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix", "postfix")
        shutil.chown(self.root / "mail", "nobody", "nogroup")
        (self.config / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.root}/queue
data_directory = {self.root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = backend.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.root}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = {self.log}
maillog_file_prefixes = {self.root}
"""
        )
        master = MASTER_PROTO.read_text().replace(
            "smtp      inet  n       -       y       -       -       smtpd",
            f"{self.port} inet n - n - - smtpd",
        )
        assert f"{self.port} inet" in master, "master.cf.proto has an unexpected smtpd line"
        (self.config / "master.cf").write_text(master)

    def start(self) -> PostfixBackend:
        self._write_config()
        subprocess.run([POSTFIX, "-c", str(self.config), "start"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.address, timeout=1) as sock:
                    if sock.recv(100).startswith(b"220"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"private Postfix did not start; log: {self.log_text()}")

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self) -> list[bytes]:
        directory = self.maildir / "new"
        return [path.read_bytes() for path in sorted(directory.glob("*"))] if directory.exists() else []

    def wait_for_messages(self, count: int, timeout: float = 20) -> list[bytes]:
        """Postfix delivers after queueing: wait, bounded, until ``count`` messages are in."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages()) < count:
            time.sleep(0.05)
        return self.messages()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> PostfixBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
