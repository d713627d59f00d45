"""TLS contexts for both legs (design.md §7): one ``ssl.SSLContext`` per role, built from settings
and swapped whole on SIGHUP, and the throwaway certificate of the embedded defaults.

Certificates are read and made with the standard ``ssl`` module and ``cryptography`` (the
well-kept library for X.509 in Python); nothing here is hand-rolled crypto.
"""

from __future__ import annotations

import datetime
import os
import ssl

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cert_path: str, key_path: str, min_version: str = "1.2") -> ssl.SSLContext:
    """The context for clients' STARTTLS and implicit TLS. Raises ValueError naming what is
    wrong: an unreadable file, a key that does not match the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    # Senders on the Internet present no client certificate, and an MX must not ask for one.
    context.verify_mode = ssl.CERT_NONE
    for path in (cert_path, key_path):
        if not os.access(path, os.R_OK):
            raise ValueError(f"cannot read {path}")
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as error:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(error) else str(error)
        raise ValueError(reason) from None
    # Session resumption: OpenSSL's stateless tickets (TLS 1.2 and 1.3) are on by default; keep
    # the TLS 1.3 ticket count explicit so a resumed handshake stays the cheap case.
    context.num_tickets = 2
    return context


def backend_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """The context for STARTTLS to the backend."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def certificate_expiry(cert_path: str) -> datetime.datetime:
    """When the (first) certificate in ``cert_path`` expires, UTC."""
    from cryptography import x509

    with open(cert_path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    return certificate.not_valid_after_utc


def make_self_signed(hostname: str, directory: str) -> tuple[str, str]:
    """A throwaway certificate and key for ``hostname``, written to ``directory``: the embedded
    defaults offer STARTTLS with it so that trying edgeproxy out shows TLS working."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "edgeproxy-selfsigned.crt")
    key_path = os.path.join(directory, "edgeproxy-selfsigned.key")
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path
