"""Credentials: where they come from, and keeping them fresh.

A *source* does one exchange and nothing else (``async fetch() -> AwsCredentials``)::

    class Static(CredentialSource):
        kind = "static"
        async def fetch(self) -> AwsCredentials:
            return AwsCredentials(self.key_id, self.secret)

``Refreshing`` wraps any fetch with caching, refresh windows sized to the
credential's lifetime, one shared refresh for concurrent callers, and backoff
after failures. A ``Provider`` is what a route sees: a named entry that hands
out AWS credentials and, for Cognito users, user pool tokens.

botocore blocks, so every botocore call goes through ``run_blocking``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

log = logging.getLogger("signing_proxy.credentials")

# Seconds between looks at a healthy source's files (a stat costs microseconds: not on every request).
# While the source is failing (an expired SSO session), every request looks, so a fix is seen at once.
CHANGE_CHECK_EVERY = 1.0

# Own pool, so a slow STS or Cognito cannot starve the loop's default executor.
_BLOCKING_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="aws-call")


async def run_blocking(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking (botocore) call off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_BLOCKING_POOL, lambda: function(*args, **kwargs))


class CredentialsUnavailable(Exception):
    """Credentials cannot be had right now.

    ``str(error)`` is shown to users in 503 bodies and logs, so it must never
    carry a secret; ``reason`` is a short machine-readable code.
    """

    def __init__(self, message: str, reason: str = "credentials_unavailable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # epoch seconds; None: does not expire
    identity: str = ""  # what to show for these credentials: a role ARN, a Cognito identity id
    # The part of the access key id that is safe to log: read for every signed request's access line.
    key_prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_prefix", self.access_key_id[:8] + "…")


class Expiring(Protocol):
    @property
    def expires_at(self) -> float | None: ...


class CredentialSource(ABC):
    """One way of obtaining AWS credentials; no caching (``Refreshing`` does that)."""

    kind: ClassVar[str]

    @abstractmethod
    async def fetch(self) -> AwsCredentials:
        """Do the exchange once; raise ``CredentialsUnavailable`` with a safe message."""

    def changed(self) -> bool:
        """True when what ``fetch`` returned is known to be out of date (the files it read were rewritten)."""
        return False


T = TypeVar("T", bound=Expiring)


def refresh_windows(lifetime: float) -> tuple[float, float]:
    """``(advisory, mandatory)`` seconds before expiry, scaled to the lifetime.

    Advisory: refresh in the background, keep serving the old value. Mandatory:
    callers wait for the refresh. An hour-long credential is renewed 15 and 6
    minutes ahead; a 90-second one 22 and 9 seconds ahead, not on every request.
    """
    advisory = min(15 * 60.0, max(1.0, lifetime * 0.25))
    mandatory = min(10 * 60.0, max(0.5, lifetime * 0.10))
    return advisory, mandatory


class Refreshing(Generic[T]):
    """Caches what ``fetch`` returns and renews it before it expires.

    Concurrent callers share one refresh. A failed refresh while the old value
    is still valid keeps serving it and retries with exponential backoff; once
    nothing valid is left, callers get the last error (fast, during backoff).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        *,
        name: str,
        clock: Callable[[], float] = time.time,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        changed: Callable[[], bool] | None = None,
    ) -> None:
        self._fetch = fetch
        self._changed = changed
        self._change_check_at = 0.0
        self.name = name
        self._clock = clock
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._value: T | None = None
        self._obtained_at = 0.0
        self._refresh: asyncio.Task[T] | None = None
        self._error: CredentialsUnavailable | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self.refresh_count = 0
        self.failure_count = 0

    @property
    def value(self) -> T | None:
        return self._value

    @property
    def error(self) -> CredentialsUnavailable | None:
        return self._error

    def _valid(self, now: float) -> bool:
        if self._value is None:
            return False
        expires_at = self._value.expires_at
        return expires_at is None or now < expires_at - 1.0

    def _stage(self, now: float) -> str:
        """``fresh``, ``advisory``, ``mandatory`` (or nothing held yet)."""
        if self._value is None:
            return "mandatory"
        expires_at = self._value.expires_at
        if expires_at is None:
            return "fresh"
        advisory, mandatory = refresh_windows(max(1.0, expires_at - self._obtained_at))
        remaining = expires_at - now
        if remaining <= mandatory:
            return "mandatory"
        if remaining <= advisory:
            return "advisory"
        return "fresh"

    def fresh(self) -> T | None:
        """The value held when it is fresh and no check of its files is due (what ``get`` would
        return at once), else None: most requests take it without a coroutine."""
        now = self._clock()
        return self._value if not self._check_due(now) and self._stage(now) == "fresh" else None

    def _check_due(self, now: float) -> bool:
        """Time to look whether the source's files changed (at most once a second, every time while failing)."""
        return self._changed is not None and (self._error is not None or now >= self._change_check_at)

    async def get(self) -> T:
        now = self._clock()
        stage = self._stage(now)
        if self._check_due(now):
            self._change_check_at = now + CHANGE_CHECK_EVERY
            if self._changed():
                stage, self._next_attempt = "mandatory", 0.0  # new files: load them now, whatever the backoff
        if stage == "fresh":
            return self._value  # type: ignore[return-value]
        in_backoff = now < self._next_attempt
        if stage == "advisory" or (in_backoff and self._valid(now)):
            if not in_backoff:
                self._start_refresh()
            return self._value  # type: ignore[return-value]
        if in_backoff and self._refresh is None:
            assert self._error is not None
            raise self._error
        try:
            return await asyncio.shield(self._start_refresh())
        except CredentialsUnavailable:
            if self._valid(self._clock()):
                return self._value  # type: ignore[return-value]
            raise

    def _start_refresh(self) -> asyncio.Task[T]:
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._do_refresh())
        return self._refresh

    async def _do_refresh(self) -> T:
        previous = self._value
        try:
            value = await self._fetch()
        except CredentialsUnavailable as error:
            self._record_failure(error)
            raise
        except Exception as error:  # a bug or an unexpected botocore error: never leak its text
            log.exception("credentials %s: unexpected error while refreshing", self.name)
            unavailable = CredentialsUnavailable(
                f"unexpected {type(error).__name__} while obtaining credentials {self.name!r}",
                "internal_error",
            )
            self._record_failure(unavailable)
            raise unavailable from None
        finally:
            self._refresh = None
        self.refresh_count += 1
        self._value, self._obtained_at, self._error = value, self._clock(), None
        if previous is not None and value.expires_at is not None and value.expires_at == previous.expires_at:
            # The source handed back what we had (botocore refreshes on its own
            # schedule): wait before asking again instead of asking every request.
            self._failures += 1
            self._next_attempt = self._clock() + self._backoff()
        else:
            self._failures, self._next_attempt = 0, 0.0
        return value

    def _backoff(self) -> float:
        return min(self._max_backoff, self._min_backoff * 2 ** max(0, self._failures - 1))

    def _record_failure(self, error: CredentialsUnavailable) -> None:
        self.failure_count += 1
        self._failures += 1
        self._error = error
        self._next_attempt = self._clock() + self._backoff()
        level = logging.WARNING if self._valid(self._clock()) else logging.ERROR
        log.log(level, "credentials %s: refresh failed (%s): %s", self.name, error.reason, error)

    def status(self) -> dict[str, Any]:
        """A secret-free summary for ``check`` and readiness."""
        now = self._clock()
        value = self._value
        expires_at = value.expires_at if value is not None else None
        return {
            "ready": self._valid(now),
            "expires_at": expires_at,
            "expires_in": None if expires_at is None else round(expires_at - now, 1),
            "error": str(self._error) if self._error else None,
            "reason": self._error.reason if self._error else None,
        }


class Provider:
    """A named ``credentials:`` entry as routes use it."""

    def __init__(
        self,
        name: str,
        kind: str,
        credentials: Refreshing[AwsCredentials] | None,
        tokens: Refreshing[Any] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.credentials = credentials
        self.tokens = tokens

    async def aws_credentials(self) -> AwsCredentials:
        if self.credentials is None:
            raise CredentialsUnavailable(
                f"credentials {self.name!r} give user pool tokens only: set identity_pool_id to sign requests",
                "no_identity_pool",
            )
        return await self.credentials.get()

    def fresh_credentials(self) -> AwsCredentials | None:
        """The credentials held, when fresh (see ``Refreshing.fresh``); else await ``aws_credentials``."""
        return self.credentials.fresh() if self.credentials is not None else None

    async def user_pool_tokens(self) -> Any:
        if self.tokens is None:
            raise CredentialsUnavailable(f"credentials {self.name!r} are not a Cognito user", "no_tokens")
        return await self.tokens.get()

    def status(self) -> dict[str, Any]:
        parts = [r for r in (self.tokens, self.credentials) if r is not None]
        statuses = [r.status() for r in parts]
        summary: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "ready": all(s["ready"] for s in statuses),
            "error": next((s["error"] for s in statuses if s["error"]), None),
        }
        value = self.credentials.value if self.credentials else None
        if value is not None:
            summary["access_key"] = value.key_prefix
            summary["identity"] = value.identity
            summary["expires_at"] = value.expires_at
        elif self.tokens is not None and self.tokens.value is not None:
            summary["expires_at"] = self.tokens.value.expires_at
        return summary
