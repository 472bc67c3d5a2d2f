"""TLS towards upstreams: the client context, and a name for each failure a user can act on.

A handshake that fails says only "certificate verify failed" or an alert
name; the 502 body says instead which of the usual causes it is (a private CA
nobody configured, a certificate for another name, an expired one, a client
certificate the server refused) and what to change.
"""

from __future__ import annotations

import ssl

from .egress import EgressError


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying client context: ``ca_bundle`` replaces the system's CAs (as in the AWS CLI).

    Without it OpenSSL's defaults apply, which honour ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR``. A client certificate is added with ``load_cert_chain``.
    Raises ``OSError`` (``ssl.SSLError`` included) for an unusable file.
    """
    return ssl.create_default_context(cafile=ca_bundle)


# Verification codes worth their own reason (OpenSSL's X509_V_ERR_*).
_VERIFY_REASONS = {
    62: ("upstream_certificate_name_mismatch", "its certificate is not for this host name"),
    64: ("upstream_certificate_name_mismatch", "its certificate is not for this IP address"),
    10: ("upstream_certificate_expired", "its certificate has expired"),
    9: ("upstream_certificate_expired", "its certificate is not yet valid (check this machine's clock)"),
}
# Alerts a server sends when it wants a client certificate and did not get one it accepts.
_CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)


def tls_failure(error: ssl.SSLError, host: str) -> EgressError:
    """An ``EgressError`` that says why TLS with ``host`` failed, in words a user can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        reason, what = _VERIFY_REASONS.get(
            code, ("upstream_certificate_unknown", "its certificate is not signed by a CA this proxy trusts")
        )
        advice = "; set ca_bundle (or AWS_CA_BUNDLE) to the CA that signed it" if code not in _VERIFY_REASONS else ""
        return EgressError(f"TLS failed: {what} ({error.verify_message}){advice}", reason)
    if error.reason in _CLIENT_CERT_ALERTS:
        return EgressError(
            f"TLS failed: it refused our client certificate ({error.reason}); "
            "check the route's client_cert and client_key",
            "upstream_client_certificate_refused",
        )
    return EgressError(f"TLS failed: {error.reason or error}", "upstream_tls_error")
