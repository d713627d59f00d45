"""A private Postfix instance as the proxy's real backend (shared with the bench harness)."""

from __future__ import annotations

from bench.servers import PostfixBackend, PrivatePostfix

__all__ = ["PostfixBackend", "TlsPostfixBackend", "available"]


def available() -> bool:
    return PrivatePostfix.available()


class TlsPostfixBackend(PostfixBackend):
    """:class:`PostfixBackend` that also offers STARTTLS (``smtpd_tls_security_level = may``) with
    the given certificate and key, and names the TLS session in its ``Received:`` header."""

    def __init__(self, cert_file: str, key_file: str, domain: str = "example.test") -> None:
        super().__init__(domain)
        self.main_cf += (
            f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {cert_file}\n"
            f"smtpd_tls_key_file = {key_file}\nsmtpd_tls_received_header = yes\n"
        )
