"""The client side of Cognito's SRP-6a password proof (``USER_SRP_AUTH``), as pure functions.

No I/O, no clock, no randomness except in ``generate_private_value``: every
step takes plain inputs so tests can pin ``a``, the salt, ``B`` and the
timestamp and compare against an independent server-side computation.

Cognito's variant of SRP-6a (RFC 5054, 3072-bit group, SHA-256) has quirks the
server checks byte for byte:

* numbers are hashed in their *minimal two's-complement* big-endian form
  (``pad_hex``): a leading ``00`` byte when the top bit is set, no padding to
  the length of N;
* ``x = H(salt || H(pool_name || user_id || ":" || password))`` where
  ``pool_name`` is the part of the pool id after ``_``;
* the session key is 16 bytes of HKDF-SHA256 over ``S`` with ``u`` as salt and
  the info string ``Caldera Derived Key``;
* the proof is an HMAC over ``pool_name || user_id || secret_block || timestamp``
  with a timestamp such as ``Sun Nov 2 04:10:17 UTC 2026`` (English names, day
  of month *not* zero-padded, whatever the locale).

The password only ever enters ``password_exponent``; nothing here logs.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

# RFC 3526 / RFC 5054 3072-bit MODP group, the one Cognito uses, and its generator.
N_HEX = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF"
)
N = int(N_HEX, 16)
G = 2
HKDF_INFO = b"Caldera Derived Key"
KEY_LENGTH = 16

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class SrpError(ValueError):
    """The server's challenge fails an SRP safety check (``B % N == 0`` or ``u == 0``)."""


def pad_hex(value: int) -> str:
    """``value`` as hex in its minimal two's-complement form: even length, a ``00`` before a high nibble.

    This is how Cognito (and its SDKs) turn numbers into bytes before hashing;
    padding to the length of N instead gives a different ``k``, ``u`` and key.
    """
    text = format(value, "x")
    if len(text) % 2:
        return "0" + text
    return "00" + text if text[0] in "89abcdef" else text


def hash_hex(hex_bytes: str) -> str:
    """SHA-256 of the bytes a hex string spells, as 64 hex digits."""
    return hashlib.sha256(bytes.fromhex(hex_bytes)).hexdigest()


MULTIPLIER = int(hash_hex(pad_hex(N) + pad_hex(G)), 16)  # k = H(N || g)


def generate_private_value() -> int:
    """A fresh secret ``a``: 1024 random bits, reduced mod N (never zero)."""
    while True:
        a = secrets.randbits(1024) % N
        if a:
            return a


def public_value(a: int) -> int:
    """``A = g^a mod N``, sent as ``SRP_A``."""
    big_a = pow(G, a, N)
    if big_a % N == 0:  # cannot happen for 0 < a < N; kept as the protocol's safety check
        raise SrpError("SRP A is zero mod N")
    return big_a


def scrambling_parameter(big_a: int, big_b: int) -> int:
    """``u = H(A || B)``."""
    u = int(hash_hex(pad_hex(big_a) + pad_hex(big_b)), 16)
    if u == 0:
        raise SrpError("SRP u is zero")
    return u


def pool_name(user_pool_id: str) -> str:
    """``eu-west-1_AbC123`` → ``AbC123``: the part of the pool id SRP hashes."""
    return user_pool_id.split("_", 1)[1]


def password_exponent(salt: int, user_pool_id: str, user_id: str, password: str) -> int:
    """``x = H(salt || H(pool_name || user_id || ":" || password))``."""
    identity_hash = hashlib.sha256(f"{pool_name(user_pool_id)}{user_id}:{password}".encode()).hexdigest()
    return int(hash_hex(pad_hex(salt) + identity_hash), 16)


def premaster_secret(big_b: int, a: int, u: int, x: int) -> int:
    """``S = (B - k·g^x)^(a + u·x) mod N``."""
    if big_b % N == 0:
        raise SrpError("SRP B is zero mod N")
    base = (big_b - MULTIPLIER * pow(G, x, N)) % N
    return pow(base, a + u * x, N)


def session_key(premaster: int, u: int) -> bytes:
    """The 16-byte key: HKDF-SHA256 (one block) with ``u`` as salt and ``S`` as input key material."""
    prk = hmac.new(bytes.fromhex(pad_hex(u)), bytes.fromhex(pad_hex(premaster)), hashlib.sha256).digest()
    return hmac.new(prk, HKDF_INFO + b"\x01", hashlib.sha256).digest()[:KEY_LENGTH]


def cognito_timestamp(moment: datetime.datetime) -> str:
    """``Sun Nov 2 04:10:17 UTC 2026``: the format Cognito signs; day of month not zero-padded.

    Names are spelt out here rather than with ``strftime`` so a non-English
    locale cannot change them.
    """
    utc = moment.astimezone(datetime.UTC) if moment.tzinfo else moment
    return (
        f"{_WEEKDAYS[utc.weekday()]} {_MONTHS[utc.month - 1]} {utc.day} "
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d} UTC {utc.year}"
    )


def claim_signature(key: bytes, user_pool_id: str, user_id: str, secret_block: str, timestamp: str) -> str:
    """``PASSWORD_CLAIM_SIGNATURE``: base64 HMAC-SHA256 over pool name, user id, secret block, timestamp."""
    try:
        block = base64.b64decode(secret_block)
    except (binascii.Error, ValueError):
        raise SrpError("SECRET_BLOCK is not base64") from None
    message = pool_name(user_pool_id).encode() + user_id.encode() + block + timestamp.encode()
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def secret_hash(client_secret: str, username: str, client_id: str) -> str:
    """``SECRET_HASH`` for app clients with a secret: base64 HMAC-SHA256(secret, username || client_id)."""
    digest = hmac.new(client_secret.encode(), (username + client_id).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class PasswordClaim:
    """The answer to ``PASSWORD_VERIFIER`` (without USERNAME / SECRET_HASH, which the caller adds)."""

    secret_block: str = field(repr=False)
    signature: str = field(repr=False)
    timestamp: str

    def as_challenge_responses(self) -> dict[str, str]:
        return {
            "PASSWORD_CLAIM_SECRET_BLOCK": self.secret_block,
            "PASSWORD_CLAIM_SIGNATURE": self.signature,
            "TIMESTAMP": self.timestamp,
        }


def password_claim(
    *,
    a: int,
    user_pool_id: str,
    user_id: str,
    password: str,
    salt_hex: str,
    srp_b_hex: str,
    secret_block: str,
    moment: datetime.datetime,
) -> PasswordClaim:
    """Everything between the ``PASSWORD_VERIFIER`` challenge parameters and its answer.

    ``user_id`` is the challenge's ``USER_ID_FOR_SRP`` (the internal user name),
    not necessarily what the user typed.
    """
    try:
        salt, big_b = int(salt_hex, 16), int(srp_b_hex, 16)
    except ValueError:
        raise SrpError("SALT or SRP_B is not hexadecimal") from None
    u = scrambling_parameter(public_value(a), big_b)
    x = password_exponent(salt, user_pool_id, user_id, password)
    key = session_key(premaster_secret(big_b, a, u, x), u)
    timestamp = cognito_timestamp(moment)
    return PasswordClaim(secret_block, claim_signature(key, user_pool_id, user_id, secret_block, timestamp), timestamp)
