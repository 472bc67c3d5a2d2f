"""The *server* side of Cognito's SRP-6a, written for the tests independently of ``proxy.credentials.srp``.

moto accepts any SRP proof, so the suite installs this verifier into the moto
server: a client proof is accepted only if it matches what a server holding
the password verifier ``v = g^x`` computes. It shares no code with the client:
numbers become bytes with ``int.to_bytes`` (not hex strings), and the group
prime is taken from pycognito, so a typo in ``proxy.credentials.srp.N_HEX`` cannot hide.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from pycognito.aws_srp import N_HEX as _PYCOGNITO_N_HEX

N = int(_PYCOGNITO_N_HEX, 16)
G = 2
TIMESTAMP_FORMAT = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} [1-9]\d? \d\d:\d\d:\d\d UTC \d{4}$")


def as_bytes(number: int) -> bytes:
    """Big-endian, minimal length, with a 0x00 byte in front when the top bit is set (two's complement)."""
    return number.to_bytes(number.bit_length() // 8 + 1, "big")


def sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def sha256_int(*parts: bytes) -> int:
    return int.from_bytes(sha256(*parts), "big")


K = sha256_int(as_bytes(N), as_bytes(G))


def pool_name(user_pool_id: str) -> str:
    return user_pool_id.partition("_")[2]


def private_key(salt: int, user_pool_id: str, user_id: str, password: str) -> int:
    inner = sha256(f"{pool_name(user_pool_id)}{user_id}:{password}".encode())
    return sha256_int(as_bytes(salt), inner)


def hkdf16(input_key: bytes, salt: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256, first 16 bytes, info "Caldera Derived Key"."""
    prk = hmac.new(salt, input_key, hashlib.sha256).digest()
    return hmac.new(prk, b"Caldera Derived Key" + bytes([1]), hashlib.sha256).digest()[:16]


@dataclass
class ServerChallenge:
    """One PASSWORD_VERIFIER exchange, as Cognito's server would hold it."""

    user_pool_id: str
    user_id: str
    salt: int
    verifier: int
    b: int
    big_a: int

    @classmethod
    def start(
        cls,
        user_pool_id: str,
        user_id: str,
        password: str,
        big_a: int,
        *,
        salt: int | None = None,
        b: int | None = None,
    ) -> ServerChallenge:
        if big_a % N == 0:
            raise ValueError("A is zero mod N")
        salt = salt if salt is not None else int.from_bytes(os.urandom(16), "big")
        b = b if b is not None else int.from_bytes(os.urandom(128), "big") % N
        verifier = pow(G, private_key(salt, user_pool_id, user_id, password), N)
        return cls(user_pool_id, user_id, salt, verifier, b, big_a)

    @property
    def big_b(self) -> int:
        return (K * self.verifier + pow(G, self.b, N)) % N

    @property
    def salt_hex(self) -> str:
        return format(self.salt, "x")

    @property
    def srp_b_hex(self) -> str:
        return format(self.big_b, "x")

    def key(self) -> bytes:
        u = sha256_int(as_bytes(self.big_a), as_bytes(self.big_b))
        premaster = pow(self.big_a * pow(self.verifier, u, N), self.b, N)
        return hkdf16(as_bytes(premaster), as_bytes(u))

    def expected_signature(self, secret_block: str, timestamp: str) -> str:
        message = (
            pool_name(self.user_pool_id).encode()
            + self.user_id.encode()
            + base64.b64decode(secret_block)
            + timestamp.encode()
        )
        return base64.b64encode(hmac.new(self.key(), message, hashlib.sha256).digest()).decode()

    def accepts(self, secret_block: str, timestamp: str, signature: str) -> bool:
        if not TIMESTAMP_FORMAT.match(timestamp):
            return False
        return hmac.compare_digest(self.expected_signature(secret_block, timestamp), signature)
