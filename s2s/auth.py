"""Who may call: server API keys, ephemeral client secrets, allowed origins.

Keys are compared in constant time and never logged. A client secret (``ek_…``) is minted by
a holder of a server key, carries the session config the call must use, and expires; until then
it makes any number of calls, as OpenAI's do, or one (``single_use``).
With ``--workers`` a secret minted in one process is redeemed in another, so they live as files in
the server's run directory instead of a dict; deleting the file is what uses a single-use one up,
and only one process can succeed at that. Pure bookkeeping: the HTTP side lives in ``signaling``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from s2s.protocol.session_config import SessionPatch

SECRET_PREFIX = "ek_"
DEFAULT_SECRET_TTL_S = 600
MAX_SECRET_TTL_S = 7200
_MAX_LIVE_SECRETS = 10_000
#: The bytes of all live secrets' sessions (each may be 256 KiB: 10,000 of them were 2.5 GB).
_MAX_LIVE_BYTES = 64 * 1024 * 1024


def is_client_secret(token: str | None) -> bool:
    return token is not None and token.startswith(SECRET_PREFIX)


@dataclass(frozen=True, slots=True)
class ClientSecret:
    value: str
    expires_at: int  # unix seconds
    session: SessionPatch
    owner: str  # the server key that minted it (for sideband ownership)
    size: int = 0  # bytes of its session, as kept


@dataclass(eq=False)
class Keys:
    """The server keys of this process and the client secrets minted with them."""

    api_keys: tuple[str, ...] = ()
    #: A directory every worker of the server shares; None keeps secrets in this process.
    shared_dir: Path | None = None
    #: A secret makes one call (else any number until it expires).
    single_use: bool = False
    _secrets: dict[str, ClientSecret] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.api_keys)

    def server_key(self, presented: str | None) -> str | None:
        """The server key ``presented`` matches, compared in constant time, or None."""
        if presented is None:
            return None
        # aiohttp hands bytes that are not UTF-8 over as surrogates: such a token is no key.
        given = presented.encode("utf-8", "surrogateescape")
        match = None
        for key in self.api_keys:
            # Compare against every key so the time taken does not tell which one is close.
            if hmac.compare_digest(given, key.encode()):
                match = key
        return match

    def mint(self, owner: str, session: SessionPatch, ttl_s: int) -> ClientSecret:
        live, held = self._expire()
        if live >= _MAX_LIVE_SECRETS:
            raise OverflowError("too many live client secrets")
        size = len(msgspec.json.encode(session))
        if held + size > _MAX_LIVE_BYTES:
            raise OverflowError(f"live client secrets' sessions hold {held} bytes")
        ttl = max(10, min(ttl_s, MAX_SECRET_TTL_S))
        secret = ClientSecret(
            value=SECRET_PREFIX + secrets.token_urlsafe(24),
            expires_at=int(time.time()) + ttl,
            session=session,
            owner=owner,
            size=size,
        )
        if self.shared_dir is None:
            self._secrets[secret.value] = secret
        else:
            self._store(secret)
        return secret

    def redeem(self, presented: str | None) -> ClientSecret | None:
        """A live client secret's record, used up if single-use; None for any other token."""
        if presented is None or not presented.startswith(SECRET_PREFIX):
            return None
        if self.shared_dir is not None:
            return self._take(presented)
        self._expire()
        # The dict lookup is by value; a forged value is simply absent. Secrets are long random
        # strings, so a timing difference in the lookup reveals nothing usable.
        if self.single_use:
            return self._secrets.pop(presented, None)
        return self._secrets.get(presented)

    def restore(self, secret: ClientSecret) -> None:
        """Give back a single-use secret ``redeem`` used up for a call that was not made (a full
        server, a bad offer), so the client can try again with it until it expires."""
        if not self.single_use or secret.expires_at <= time.time():
            return
        if self.shared_dir is None:
            self._secrets[secret.value] = secret
        else:
            self._store(secret)

    def _expire(self) -> tuple[int, int]:
        """Forget expired secrets; the number still live, and the bytes of their sessions."""
        now = time.time()
        if self.shared_dir is not None:
            live = held = 0
            for entry in os.scandir(self.shared_dir):
                if entry.name.endswith(".part"):  # being written by a worker right now
                    continue
                try:
                    stat = entry.stat()  # a stored secret's mtime is its expiry: see _store
                except FileNotFoundError:  # redeemed by another worker meanwhile
                    continue
                if stat.st_mtime > now:
                    live, held = live + 1, held + stat.st_size
                else:
                    Path(entry.path).unlink(missing_ok=True)
            return live, held
        for value in [v for v, s in self._secrets.items() if s.expires_at <= now]:
            del self._secrets[value]
        return len(self._secrets), sum(s.size for s in self._secrets.values())

    # -- secrets shared by the workers of one server ----------------------------------------------

    def _path(self, value: str) -> Path:
        assert self.shared_dir is not None
        # Named by a hash: the run directory never holds a usable secret, nor a server key
        # (the owner is stored as its position in api_keys).
        return self.shared_dir / hashlib.sha256(value.encode()).hexdigest()

    def _store(self, secret: ClientSecret) -> None:
        path = self._path(secret.value)
        owner = self.api_keys.index(secret.owner) if secret.owner in self.api_keys else -1
        record = _StoredSecret(secret.expires_at, owner, secret.session)
        partial = path.with_suffix(".part")
        partial.write_bytes(msgspec.json.encode(record))
        os.utime(partial, (secret.expires_at, secret.expires_at))
        partial.rename(path)  # whole or absent, for a worker redeeming it at the same moment

    def _take(self, presented: str) -> ClientSecret | None:
        path = self._path(presented)
        try:
            data = path.read_bytes()
            if self.single_use:
                path.unlink()  # the one process whose unlink succeeds has used the secret up
        except FileNotFoundError:
            return None
        record = msgspec.json.decode(data, type=_StoredSecret)
        if record.expires_at <= time.time():
            return None
        owner = self.api_keys[record.owner] if 0 <= record.owner < len(self.api_keys) else ""
        return ClientSecret(presented, record.expires_at, record.session, owner)


class _StoredSecret(msgspec.Struct, array_like=True):
    expires_at: int
    owner: int
    session: SessionPatch


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
