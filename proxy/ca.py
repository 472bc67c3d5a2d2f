"""The local certificate authority of forward-proxy mode: one CA per user, leaves minted per host.

A client that sends ``CONNECT abc.execute-api.eu-west-1.amazonaws.com:443`` gets
TLS terminated by the proxy with a leaf certificate for that name, issued here.
The client trusts it because the user told it to trust this CA (``signing-proxy
ca`` prints how). Modelled on mitmproxy's ``CertStore``, with what it lacks:

* the CA is **name-constrained** (X.509 permitted DNS subtrees) to the suffixes of
  the configured forward hosts (``amazonaws.com``, ``on.aws``, ...), and every IP
  address is excluded: a leaked key cannot impersonate any other site. With
  ``listen_tls: auto`` it also permits the loopback names (``localhost``,
  127.0.0.0/8, ::1), which then are the only addresses it permits, for the
  listener's own certificate. It is issued again, with a new key, when what it
  must permit changes;
* leaf certificates live ``LEAF_LIFETIME`` (hours), are kept in memory only and
  share one key per process (a new key per host would cost more than it protects);
* the directory is the owner's alone (0700), the key file 0600, written
  atomically; a key file others may read is refused. The trust files
  (``ca.pem``, ``bundle.pem``) hold certificates only.

ECDSA P-256 throughout: every TLS client of the last decade takes it, and a key
is made in microseconds where RSA takes tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import replace_file

log = logging.getLogger("signing_proxy.ca")

CA_CERT, CA_KEY, BUNDLE = "ca.pem", "ca-key.pem", "bundle.pem"
DEFAULT_SUFFIXES = ("amazonaws.com", "on.aws")  # when a CA is made before any forward host is configured
CA_LIFETIME = datetime.timedelta(days=825)
CA_RENEW_BEFORE = datetime.timedelta(days=30)
LEAF_LIFETIME = datetime.timedelta(hours=12)
# What ``listen_tls: auto`` adds to the constraints, and the names of the listener's certificate.
LOOPBACK = ("localhost", "127.0.0.0/8", "::1/128")
LISTENER_NAMES = ("localhost", "127.0.0.1", "::1")
LEAF_RENEW_BEFORE = 3600.0  # seconds: a cached leaf this close to expiry is minted again
BACKDATE = datetime.timedelta(hours=1)  # a client whose clock is a little behind still accepts a new leaf
MAX_CACHED_LEAVES = 1024
# Bundles of the system's trusted CAs, first found is used (for clients whose variable replaces them).
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
)


class CAError(Exception):
    """The CA cannot be used; the message says which file and what to do."""


class CertificateAuthority:
    """A CA loaded from (or created in) its directory; ``context_for(host)`` gives a TLS server context."""

    def __init__(self, directory: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._contexts: dict[str, tuple[float, ssl.SSLContext]] = {}

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def bundle_path(self) -> Path:
        return self.directory / BUNDLE

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY

    @property
    def suffixes(self) -> tuple[str, ...]:
        """What the name constraints permit: DNS suffixes, and the loopback networks when it certifies the listener."""
        return permitted_suffixes(self.certificate)

    @staticmethod
    def path(directory: str | Path) -> Path:
        return Path(directory).expanduser()

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        directory: str | Path,
        suffixes: Iterable[str] | None = None,
        *,
        loopback: bool = False,
        renew: bool = False,
    ) -> CertificateAuthority:
        """The CA in ``directory``, created on first use, issued again when needed.

        ``suffixes``: what the name constraints must permit; a CA permitting
        anything else is replaced. None keeps whatever CA exists (a new one
        permits ``DEFAULT_SUFFIXES``). ``loopback`` adds ``LOOPBACK`` (for
        ``listen_tls: auto``). ``renew`` always makes a new key and
        certificate. Raises ``CAError``.
        """
        path = cls.path(directory)
        wanted = scope(suffixes or (), loopback) if suffixes is not None or loopback else None
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.stat().st_mode & 0o077:
                path.chmod(0o700)
            with _locked(path):
                loaded = None if renew else _load(path)
                reason = "renewal was asked for" if renew else "none exists yet"
                if loaded is not None:
                    certificate, _ = loaded
                    reason = _stale(certificate, wanted)
                if reason:
                    certificate, key = _issue(wanted or (renew and _suffixes_on_disk(path)) or DEFAULT_SUFFIXES)
                    _write(path, certificate, key)
                    log.warning(
                        "local CA issued in %s (%s); it signs names under %s only. "
                        "Clients must trust %s: see `signing-proxy ca`",
                        path, reason, ", ".join(permitted_suffixes(certificate)), path / CA_CERT,
                    )  # fmt: skip
                else:
                    assert loaded is not None
                    certificate, key = loaded
                _write_bundle(path, certificate)
        except OSError as error:
            raise CAError(f"cannot use the CA directory {path}: {error.strerror or error}") from None
        return cls(path, certificate, key)

    # ------------------------------------------------------------ leaves

    def context_for(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf certificate for ``host`` (minted once, cached for hours)."""
        now = time.time()
        cached = self._contexts.get(host)
        if cached is not None and cached[0] - LEAF_RENEW_BEFORE > now:
            return cached[1]
        expires, context = self._mint(host)
        self._contexts.pop(host, None)
        if len(self._contexts) >= MAX_CACHED_LEAVES:
            del self._contexts[next(iter(self._contexts))]  # the oldest minted
        self._contexts[host] = (expires, context)
        return context

    def listener(self) -> ListenerCertificate:
        """The HTTPS listener's certificate (``LISTENER_NAMES``): the CA must permit ``LOOPBACK``."""
        if not set(LOOPBACK) <= set(self.suffixes):
            raise CAError(f"{self.cert_path} does not permit the loopback names (open it with loopback=True)")
        return ListenerCertificate(self)

    def leaf(
        self, host: str, key: ec.EllipticCurvePrivateKey | None = None, *, also: Iterable[str] = ()
    ) -> x509.Certificate:
        """A leaf certificate for ``host`` (and the names ``also``) signed by this CA, for the leaf key unless ``key``.

        A name that is an IP address goes in the certificate as one (SAN IP), others as DNS names.
        """
        now = datetime.datetime.now(datetime.UTC)
        public = (key or self._leaf_key).public_key()
        ca_key_id = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in (host, *also)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _mint(self, host: str) -> tuple[float, ssl.SSLContext]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        return self._load_leaf(context, self.leaf(host)), context

    def _load_leaf(self, context: ssl.SSLContext, certificate: x509.Certificate) -> float:
        """Put ``certificate`` (for the leaf key) in ``context``; its expiry (epoch seconds)."""
        with _pem_file(certificate.public_bytes(serialization.Encoding.PEM) + self._leaf_key_pem) as path:
            context.load_cert_chain(path)
        return certificate.not_valid_after_utc.timestamp()


class ListenerCertificate:
    """The ``listen_tls: auto`` certificate: one TLS context whose leaf ``renew()`` replaces in place.

    The listening socket keeps the same ``SSLContext`` for its life; loading a new
    chain into it changes what later handshakes present, while connections
    already open keep theirs. The server calls ``renew()`` when ``renew_in()``
    says so (``LEAF_RENEW_BEFORE`` ahead of expiry).
    """

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.renew()

    def renew(self, ca: CertificateAuthority | None = None) -> None:
        """Mint a new leaf (from ``ca`` when the CA was issued again) for the handshakes to come."""
        self._ca = ca or self._ca
        self.certificate = self._ca.leaf(LISTENER_NAMES[0], also=LISTENER_NAMES[1:])
        self.expires = self._ca._load_leaf(self.context, self.certificate)

    def renew_in(self) -> float:
        """Seconds until the leaf should be renewed (0 when it is due)."""
        return max(0.0, self.expires - LEAF_RENEW_BEFORE - time.time())


# ---------------------------------------------------------------- the CA files


def scope(suffixes: Iterable[str], loopback: bool) -> tuple[str, ...]:
    """What a CA must permit (sorted as ``permitted_suffixes`` gives it): the suffixes, and ``LOOPBACK`` if asked."""
    return tuple(sorted({*suffixes, *(LOOPBACK if loopback else ())}))


def permitted_suffixes(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP networks (as text) a CA certificate's name constraints permit (sorted)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return ()
    permitted = constraints.permitted_subtrees or ()
    kinds = (x509.DNSName, x509.IPAddress)
    return tuple(sorted(str(name.value) for name in permitted if isinstance(name, kinds)))


def _general_name(name: str) -> x509.GeneralName:
    """``name`` as a SAN entry: an IP address or network as one, anything else as a DNS name."""
    try:
        address = ipaddress.ip_network(name) if "/" in name else ipaddress.ip_address(name)
    except ValueError:
        return x509.DNSName(name)
    return x509.IPAddress(address)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _issue(suffixes: Iterable[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "signing-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"signing-proxy local CA ({socket.gethostname()[:30]})"),
        ]
    )
    permitted = [_general_name(name) for name in sorted(set(suffixes))]
    # Without a permitted IP subtree every address would be permitted: exclude them all. With one (the
    # loopback networks), addresses outside the permitted subtrees are refused already, IPv6 as IPv4.
    any_ip = not any(isinstance(name, x509.IPAddress) for name in permitted)
    constraints = x509.NameConstraints(
        permitted_subtrees=permitted,
        excluded_subtrees=[
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ]
        if any_ip
        else None,
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _load(path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA stored in ``path``, or None when there is none; raises ``CAError`` for an unusable one."""
    cert_file, key_file = path / CA_CERT, path / CA_KEY
    if not cert_file.exists() and not key_file.exists():
        return None
    try:
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise CAError(
                f"{key_file} may be read by others (mode {mode:o}): `chmod 600 {key_file}`, "
                "or make a new CA with `signing-proxy ca --renew`"
            )
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError as error:
        raise CAError(f"{error.filename} is missing: make a new CA with `signing-proxy ca --renew`") from None
    except ValueError:
        unusable = f"{path} holds no usable CA (unreadable PEM): make a new one with `signing-proxy ca --renew`"
        raise CAError(unusable) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise CAError(f"{key_file} is not the key of {cert_file}: make a new CA with `signing-proxy ca --renew`")
    return certificate, key


def _suffixes_on_disk(path: Path) -> tuple[str, ...]:
    """What the stored CA certificate permits (a renewal keeps it), or () when there is none to read."""
    try:
        return permitted_suffixes(x509.load_pem_x509_certificate((path / CA_CERT).read_bytes()))
    except (OSError, ValueError):
        return ()


def _stale(certificate: x509.Certificate, wanted: tuple[str, ...] | None) -> str:
    """Why a stored CA must be issued again, or "" when it may be used."""
    if certificate.not_valid_after_utc - CA_RENEW_BEFORE < datetime.datetime.now(datetime.UTC):
        return "the previous one expires within 30 days"
    if wanted is not None and permitted_suffixes(certificate) != wanted:
        return f"the configured names changed from {', '.join(permitted_suffixes(certificate))}"
    return ""


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Replace the key (0600) and certificate atomically: a reader sees the old pair or the new one."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    replace_file(path / CA_KEY, key_pem, 0o600)
    replace_file(path / CA_CERT, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_bundle(path: Path, certificate: x509.Certificate) -> None:
    """``bundle.pem``: the system's trusted CAs plus ours, for variables that replace the system's list."""
    ours = certificate.public_bytes(serialization.Encoding.PEM)
    system = b""
    for candidate in (ssl.get_default_verify_paths().openssl_cafile, *SYSTEM_BUNDLES):
        with contextlib.suppress(OSError):
            if Path(candidate).resolve() != (path / BUNDLE).resolve():
                system = Path(candidate).read_bytes()
                break
    content = system.rstrip(b"\n") + b"\n" + ours if system else ours
    bundle = path / BUNDLE
    with contextlib.suppress(OSError):
        if bundle.read_bytes() == content:
            return
    replace_file(bundle, content, 0o644)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the directory's lock: worker processes and a concurrent ``signing-proxy ca`` wait their turn."""
    descriptor = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _pem_file(content: bytes) -> Iterator[str]:
    """A path to ``content`` for ``load_cert_chain`` (which reads files only): in memory where Linux allows."""
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("signing-proxy-leaf", os.MFD_CLOEXEC)
        try:
            os.write(descriptor, content)
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    descriptor, temporary = tempfile.mkstemp(prefix="signing-proxy-leaf-")  # 0600, removed at once
    try:
        os.write(descriptor, content)
        os.close(descriptor)
        yield temporary
    finally:
        os.unlink(temporary)
