"""Who may call: server API keys, single-use ephemeral client secrets, allowed origins.

Keys are compared in constant time and never logged. A client secret (``ek_…``) is minted by
a holder of a server key, carries the session config the call must use, expires, and works once.
Pure bookkeeping: the HTTP side lives in ``signaling``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from s2s.protocol import SessionPatch

SECRET_PREFIX = "ek_"
DEFAULT_SECRET_TTL_S = 600
MAX_SECRET_TTL_S = 7200
_MAX_LIVE_SECRETS = 10_000


@dataclass(frozen=True, slots=True)
class ClientSecret:
    value: str
    expires_at: int  # unix seconds
    session: SessionPatch
    owner: str  # the server key that minted it (for sideband ownership)


@dataclass(eq=False)
class Keys:
    """The server keys of this process and the client secrets minted with them."""

    api_keys: tuple[str, ...] = ()
    _secrets: dict[str, ClientSecret] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.api_keys)

    def server_key(self, presented: str | None) -> str | None:
        """The server key ``presented`` matches, compared in constant time, or None."""
        if presented is None:
            return None
        match = None
        for key in self.api_keys:
            # Compare against every key so the time taken does not tell which one is close.
            if hmac.compare_digest(presented.encode(), key.encode()):
                match = key
        return match

    def mint(self, owner: str, session: SessionPatch, ttl_s: int) -> ClientSecret:
        self._expire()
        if len(self._secrets) >= _MAX_LIVE_SECRETS:
            raise OverflowError("too many live client secrets")
        ttl = max(10, min(ttl_s, MAX_SECRET_TTL_S))
        secret = ClientSecret(
            value=SECRET_PREFIX + secrets.token_urlsafe(24),
            expires_at=int(time.time()) + ttl,
            session=session,
            owner=owner,
        )
        self._secrets[secret.value] = secret
        return secret

    def redeem(self, presented: str | None) -> ClientSecret | None:
        """Use up a client secret: the first use of a live one returns it, anything else None."""
        if presented is None or not presented.startswith(SECRET_PREFIX):
            return None
        self._expire()
        # The dict lookup is by value; a forged value is simply absent. Secrets are long random
        # strings, so a timing difference in the lookup reveals nothing usable.
        return self._secrets.pop(presented, None)

    def _expire(self) -> None:
        now = time.time()
        for value in [v for v, s in self._secrets.items() if s.expires_at <= now]:
            del self._secrets[value]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
