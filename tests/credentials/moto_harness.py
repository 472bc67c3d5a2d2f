"""moto as a real loopback server, made stricter where the proxy's correctness depends on it.

Stock moto (5.2) accepts any SRP proof, never checks SECRET_HASH on
``USER_PASSWORD_AUTH`` or ``RespondToAuthChallenge``, ignores a client's
``ExplicitAuthFlows``, and hands every identity the same credentials without
looking at ``Logins``. Since the server runs in this process, the suite patches
those spots so the tests mean something:

* ``USER_SRP_AUTH`` gets a real ``SALT``/``SRP_B`` from ``ServerChallenge`` (the
  user's password verifier) and ``PASSWORD_VERIFIER`` accepts only a correct proof;
* SECRET_HASH is checked on every call for clients with a secret;
* a flow missing from ``ExplicitAuthFlows`` is refused as AWS refuses it;
* app clients listed in ``rotating_clients`` rotate refresh tokens, as Cognito can;
* ``GetCredentialsForIdentity`` verifies each ``Logins`` ID token (signature with
  moto's key, issuer = the provider name, ``token_use`` = id) and issues fresh,
  distinct keys, recorded so a SigV4 upstream can look the secret up.

Every Cognito / STS call is recorded in ``MotoLog`` so tests can count requests.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from moto.cognitoidentity.responses import CognitoIdentityResponse
from moto.cognitoidp.exceptions import InvalidParameterException, NotAuthorizedError
from moto.cognitoidp.models import CognitoIdpBackend
from moto.core.exceptions import JsonRESTError
from moto.sts.models import sts_backends
from moto.utilities.utils import load_resource

from tests.credentials.srp_reference import ServerChallenge

REGION = "eu-west-1"
ACCOUNT = "123456789012"
ENDPOINT_VARIABLES = {
    "cognito-idp": "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER",
    "cognito-identity": "AWS_ENDPOINT_URL_COGNITO_IDENTITY",
    "sts": "AWS_ENDPOINT_URL_STS",
}
_FLOW_PERMISSION = {
    "USER_SRP_AUTH": "ALLOW_USER_SRP_AUTH",
    "USER_PASSWORD_AUTH": "ALLOW_USER_PASSWORD_AUTH",
    "REFRESH_TOKEN_AUTH": "ALLOW_REFRESH_TOKEN_AUTH",
}


@dataclass(frozen=True)
class Call:
    operation: str  # InitiateAuth, RespondToAuthChallenge, GetId, GetCredentialsForIdentity
    detail: str  # the auth flow or challenge name; the identity pool or identity id
    scope: str  # the app client id, or the identity pool / identity id
    params: dict[str, Any] = field(default_factory=dict, compare=False)


class MotoLog:
    """Every Cognito call the server saw, in order (thread-safe: the server runs in threads)."""

    def __init__(self) -> None:
        self._calls: list[Call] = []
        self._lock = threading.Lock()

    def record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def calls(self, scope: str | None = None, operation: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self._calls
                if (scope is None or c.scope == scope) and (operation is None or c.operation == operation)
            ]

    def flows(self, client_id: str) -> list[str]:
        """``["USER_SRP_AUTH", "PASSWORD_VERIFIER", "REFRESH_TOKEN_AUTH"]`` for one app client."""
        return [c.detail for c in self.calls(client_id) if c.operation in ("InitiateAuth", "RespondToAuthChallenge")]


class StricterMoto:
    """The patches described in the module docstring, and what they remember."""

    def __init__(self, log: MotoLog) -> None:
        self.log = log
        self.issued: dict[str, str] = {}  # identity-pool access key id -> secret
        self.rotating_clients: set[str] = set()  # app clients with refresh-token rotation on
        self._pending: dict[str, ServerChallenge] = {}
        self._public_keys = jwt.PyJWKSet.from_dict(
            load_resource("moto.cognitoidp.models", "resources/jwks-public.json")
        )

    def install(self, patcher: pytest.MonkeyPatch) -> None:
        original_initiate = CognitoIdpBackend.initiate_auth
        original_respond = CognitoIdpBackend.respond_to_auth_challenge
        original_get_id = CognitoIdentityResponse.get_id
        harness = self

        def initiate_auth(backend: Any, client_id: str, auth_flow: str, auth_parameters: dict[str, str]) -> Any:
            harness.log.record(Call("InitiateAuth", auth_flow, client_id, dict(auth_parameters)))
            pool, client = _pool_and_client(backend, client_id)
            harness._check_flow(client, auth_flow)
            if auth_flow in ("USER_PASSWORD_AUTH", "USER_SRP_AUTH"):
                harness._check_secret_hash(client, auth_parameters)
            if auth_flow == "REFRESH_TOKEN_AUTH":
                auth_parameters = harness._check_refresh_secret_hash(pool, client, auth_parameters)
            result = original_initiate(backend, client_id, auth_flow, auth_parameters)
            if auth_flow == "USER_SRP_AUTH" and result.get("ChallengeName") == "PASSWORD_VERIFIER":
                harness._real_srp(backend, pool, result, auth_parameters)
            if auth_flow == "REFRESH_TOKEN_AUTH" and client_id in harness.rotating_clients:
                harness._rotate(pool, auth_parameters["REFRESH_TOKEN"], result)
            return result

        def respond_to_auth_challenge(
            backend: Any, session: str, client_id: str, challenge_name: str, responses: dict[str, str]
        ) -> Any:
            harness.log.record(Call("RespondToAuthChallenge", challenge_name, client_id, dict(responses)))
            _, client = _pool_and_client(backend, client_id)
            harness._check_secret_hash(client, responses)
            if challenge_name == "PASSWORD_VERIFIER":
                harness._check_proof(responses)
            return original_respond(backend, session, client_id, challenge_name, responses)

        def get_id(response: Any) -> str:
            pool_id = response._get_param("IdentityPoolId")
            harness.log.record(Call("GetId", pool_id, pool_id, {"Logins": response._get_param("Logins")}))
            harness._check_logins(response._get_param("Logins") or {})
            return str(original_get_id(response))

        def get_credentials_for_identity(response: Any) -> str:
            return harness._credentials_for_identity(response)

        patcher.setattr(CognitoIdpBackend, "initiate_auth", initiate_auth)
        patcher.setattr(CognitoIdpBackend, "respond_to_auth_challenge", respond_to_auth_challenge)
        patcher.setattr(CognitoIdentityResponse, "get_id", get_id)
        patcher.setattr(CognitoIdentityResponse, "get_credentials_for_identity", get_credentials_for_identity)

    # ------------------------------------------------------------ user pools

    @staticmethod
    def _check_flow(client: Any, auth_flow: str) -> None:
        allowed = client.extended_config.get("ExplicitAuthFlows") if client else None
        if allowed and _FLOW_PERMISSION.get(auth_flow, auth_flow) not in allowed:
            raise InvalidParameterException(f"{auth_flow} flow not enabled for this client")

    @staticmethod
    def _check_secret_hash(client: Any, parameters: dict[str, str]) -> None:
        if client is None or not client.generate_secret:
            return
        if parameters.get("SECRET_HASH") != _secret_hash(client, parameters.get("USERNAME", "")):
            raise NotAuthorizedError(f"Unable to verify secret hash for client {client.id}")

    def _check_refresh_secret_hash(self, pool: Any, client: Any, parameters: dict[str, str]) -> dict[str, str]:
        """AWS keys a refresh's SECRET_HASH to the *internal* user name (the sub for e-mail sign-in).

        moto checks it against the name typed at login instead; check AWS's rule,
        then hand moto the hash it expects.
        """
        stored = pool.refresh_tokens.get(parameters.get("REFRESH_TOKEN")) if pool else None
        if not stored or not client.generate_secret:
            return parameters
        typed = stored[1]
        self._check_secret_hash(client, {**parameters, "USERNAME": pool._get_user(typed).username})
        return {**parameters, "SECRET_HASH": _secret_hash(client, typed)}

    @staticmethod
    def _rotate(pool: Any, used: str, result: dict[str, Any]) -> None:
        """Refresh-token rotation, which moto lacks: a new refresh token in every refresh, the old one dead."""
        client_id, username, _ = pool.refresh_tokens[used]
        result["AuthenticationResult"]["RefreshToken"] = pool.create_refresh_token(client_id, username)[0]
        pool.refresh_tokens[used] = None

    def _real_srp(self, backend: Any, pool: Any, result: dict[str, Any], auth_parameters: dict[str, str]) -> None:
        """Replace moto's random SALT / SRP_B with a real challenge for the user's password."""
        parameters = result["ChallengeParameters"]
        user = pool._get_user(parameters["USERNAME"])
        challenge = ServerChallenge.start(
            pool.id, parameters["USER_ID_FOR_SRP"], user.password, int(auth_parameters["SRP_A"], 16)
        )
        block = base64.b64encode(os.urandom(48)).decode()
        backend.sessions[block] = backend.sessions.pop(parameters["SECRET_BLOCK"])
        parameters.update(SALT=challenge.salt_hex, SRP_B=challenge.srp_b_hex, SECRET_BLOCK=block)
        result["Session"] = block
        self._pending[block] = challenge

    def _check_proof(self, responses: dict[str, str]) -> None:
        block = responses.get("PASSWORD_CLAIM_SECRET_BLOCK", "")
        challenge = self._pending.pop(block, None)
        timestamp = responses.get("TIMESTAMP", "")
        if challenge is None or not challenge.accepts(block, timestamp, responses.get("PASSWORD_CLAIM_SIGNATURE", "")):
            raise NotAuthorizedError("Incorrect username or password.")
        signed_at = datetime.datetime.strptime(timestamp, "%a %b %d %H:%M:%S UTC %Y").replace(tzinfo=datetime.UTC)
        if abs((datetime.datetime.now(datetime.UTC) - signed_at).total_seconds()) > 300:
            raise NotAuthorizedError("Incorrect username or password.")

    # ------------------------------------------------------------ identity pools

    def _check_logins(self, logins: dict[str, str]) -> None:
        for provider, token in logins.items():
            try:
                header = jwt.get_unverified_header(token)
                claims = jwt.decode(
                    token,
                    self._public_keys[header["kid"]].key,
                    algorithms=["RS256"],
                    issuer=f"https://{provider}",
                    options={"verify_aud": False, "require": ["exp", "iss", "sub"]},
                )
            except (jwt.PyJWTError, KeyError) as error:
                raise JsonRESTError("NotAuthorizedException", f"Invalid login token. {type(error).__name__}") from None
            if claims.get("token_use") != "id":
                raise JsonRESTError("NotAuthorizedException", "Invalid login token. Not an id token.")

    def _credentials_for_identity(self, response: Any) -> str:
        identity_id = response._get_param("IdentityId")
        logins = response._get_param("Logins") or {}
        role = response._get_param("CustomRoleArn")
        self.log.record(
            Call("GetCredentialsForIdentity", identity_id, identity_id, {"Logins": logins, "CustomRoleArn": role})
        )
        self._check_logins(logins)
        key_id = "ASIA" + secrets.token_hex(8).upper()
        self.issued[key_id] = secrets.token_urlsafe(30)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        return json.dumps(
            {
                "IdentityId": identity_id,
                "Credentials": {
                    "AccessKeyId": key_id,
                    "SecretKey": self.issued[key_id],
                    "SessionToken": secrets.token_urlsafe(40),
                    "Expiration": expires.timestamp(),
                },
            }
        )

    # ------------------------------------------------------------ lookups for SigV4 upstreams

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of keys moto issued (identity pool or STS), for ``SigV4Upstream``."""
        if access_key_id in self.issued:
            return self.issued[access_key_id]
        role = sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key_id)
        return role.secret_access_key if role is not None else None


def _secret_hash(client: Any, username: str) -> str:
    digest = hmac.new(client.secret.encode(), (username + client.id).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _pool_and_client(backend: Any, client_id: str) -> tuple[Any, Any]:
    for pool in backend.user_pools.values():
        if client_id in pool.clients:
            return pool, pool.clients[client_id]
    return None, None
