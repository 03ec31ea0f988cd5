"""How the connector verifies the broker's TLS certificate, and how it explains a failure.

Trust, in order: ``--ca-bundle``; ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``; otherwise the
operating system's trust store through ``truststore`` (so a corporate root CA installed on
the machine just works, as it does for the browser). ``--insecure`` switches verification
off, loudly. Verification is never switched off silently.

When verification fails, ``inspect_certificate`` makes one extra, unverified handshake
(never used for traffic) to read who issued the certificate that was presented: that is
what tells a user "your proxy intercepts TLS" rather than "TLS failed".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from connector.proxy import open_tunnel
from connector.settings import ConnectorSettings


@dataclass(frozen=True)
class Trust:
    context: ssl.SSLContext | None  # None: verification is off (--insecure)
    source: str


def trust_for(settings: ConnectorSettings) -> Trust:
    if settings.insecure:
        return Trust(None, "none: --insecure, the broker's certificate is NOT verified")
    if settings.ca_bundle is not None:
        ctx = ssl.create_default_context(cafile=str(settings.ca_bundle))
        return Trust(ctx, f"--ca-bundle {settings.ca_bundle}")
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        return Trust(ssl.create_default_context(cafile=cafile), f"SSL_CERT_FILE={cafile}")
    capath = os.environ.get("SSL_CERT_DIR")
    if capath:
        return Trust(ssl.create_default_context(capath=capath), f"SSL_CERT_DIR={capath}")
    import truststore

    ctx = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return Trust(ctx, "the system trust store (truststore)")


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def cert_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error somewhere in an exception's cause chain."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_after: datetime

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer


def cert_info(der: bytes) -> CertInfo:
    # cryptography is loaded only to explain a failed handshake, never on the relay path.
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        assert isinstance(san, x509.SubjectAlternativeName)
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return CertInfo(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        names=tuple(names),
        not_after=cert.not_valid_after_utc,
    )


async def open_broker_stream(
    broker_url: str, proxy_url: str | None, ctx: ssl.SSLContext, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the broker, through a CONNECT tunnel when a proxy is in use."""
    url = urlsplit(broker_url)
    host = url.hostname or ""
    port = url.port or 443
    if proxy_url is None:
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout
        )
    reader, writer = await open_tunnel(proxy_url, host, port, timeout)
    try:
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname=host), timeout)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def inspect_certificate(
    broker_url: str, proxy_url: str | None, timeout: float = 10.0
) -> CertInfo | None:
    """The certificate presented on the way to the broker, read without verifying it."""
    try:
        _, writer = await open_broker_stream(broker_url, proxy_url, unverified_context(), timeout)
    except (OSError, ssl.SSLError, TimeoutError):
        return None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return cert_info(der) if der else None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def explain(error: ssl.SSLCertVerificationError, host: str, info: CertInfo | None) -> str:
    """One line: what failed, who issued the certificate, what to do about it."""
    reason = error.verify_message or str(error)
    text = f"TLS certificate verification failed for {host}: {reason}"
    if info is not None:
        text += f"; the certificate presented is for {info.subject}, issued by {info.issuer}"
    return f"{text}. Hint: {hint(error, info)}"


def hint(error: ssl.SSLCertVerificationError, info: CertInfo | None) -> str:
    reason = (error.verify_message or str(error)).lower()
    if "expired" in reason:
        return "the certificate has expired: the broker operator must renew it"
    if "hostname" in reason or "ip address mismatch" in reason:
        names = ", ".join(info.names) if info and info.names else "other names"
        return f"the certificate is valid for {names}: use one of those in --broker-url"
    if info is not None and info.self_signed:
        return (
            "the broker uses a self-signed certificate: pass that certificate with "
            "--ca-bundle (or give the broker a certificate from a public CA)"
        )
    return (
        "this machine does not trust that issuer. If it is your company's TLS-inspecting "
        "proxy, pass its root CA with --ca-bundle PATH (or SSL_CERT_FILE), or install it in "
        "the system trust store; never use --insecure outside a test"
    )
