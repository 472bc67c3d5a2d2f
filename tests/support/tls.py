"""Test CAs and TLS server contexts (trustme), for upstreams with private CAs and mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization


@dataclass
class Pki:
    """A private CA for servers, another for clients, and files of both in ``directory``."""

    directory: Path
    ca: trustme.CA
    client_ca: trustme.CA

    @classmethod
    def make(cls, directory: Path) -> Pki:
        pki = cls(directory, trustme.CA(organization_name="Corp Root CA"), trustme.CA(organization_name="Corp Clients"))
        pki.ca.cert_pem.write_to_path(str(pki.ca_file))
        return pki

    @property
    def ca_file(self) -> Path:
        return self.directory / "corp-ca.pem"

    def server(self, *names: str, expired: bool = False, client_certs: bool = False) -> ssl.SSLContext:
        """A server context with a certificate for ``names`` (default 127.0.0.1), optionally demanding client certs."""
        not_after = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1) if expired else None
        certificate = self.ca.issue_cert(
            *(names or ("127.0.0.1",)),
            not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30) if expired else None,
            not_after=not_after,
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(context)
        if client_certs:
            context.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(context)
        return context

    def client(self, signed_by: trustme.CA | None = None, password: bytes | None = None) -> tuple[Path, Path]:
        """A client certificate and its key as files (the key encrypted with ``password`` when given)."""
        certificate = (signed_by or self.client_ca).issue_cert("client@corp.example")
        name = "client" if signed_by is None else "stranger"
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
        key = certificate.private_key_pem.bytes()
        if password is not None:
            loaded = serialization.load_pem_private_key(key, None)
            key = loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        key_file.write_bytes(key)
        return cert_file, key_file


@contextlib.asynccontextmanager
async def openssl_server(pki: Pki) -> AsyncIterator[str]:
    """``openssl s_server`` demanding a client certificate from ``pki.client_ca``; yields its https URL.

    OpenSSL, not asyncio, on the server side: asyncio's server closes a failed
    handshake without flushing the TLS alert, and a real server sends one.
    """
    server_pem, client_ca = pki.directory / "s_server.pem", pki.directory / "client-ca.pem"
    pki.ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    pki.client_ca.cert_pem.write_to_path(str(client_ca))
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(server_pem), "-www",
        "-Verify", "1", "-verify_return_error", "-CAfile", str(client_ca),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(10):
            line = b""
            while not line.startswith(b"ACCEPT"):
                line = await process.stdout.readline()
                assert line, "openssl s_server ended before accepting"
        # "ACCEPT 127.0.0.1:PORT" (OpenSSL 3) names the port it bound.
        port = int(line.decode().strip().rpartition(":")[2])
        yield f"https://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()
