"""Keys: server API keys, single-use ephemeral client secrets, allowed origins."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tests.conftest import Server, StartServer
from tests.peer import CallRefused, Peer

KEY = "sk-test-0123456789"


@pytest.fixture
async def locked(start_server: StartServer) -> Server:
    return await start_server(api_keys=(KEY, "sk-other"), allowed_origins=("https://app.example",))


class KeyedPeer(Peer):
    """A peer that posts its offer with an Authorization header."""

    def __init__(self, url: str, token: str | None, **kwargs: object) -> None:
        super().__init__(url, **kwargs)  # type: ignore[arg-type]
        self.token = token

    async def _post_offer(self, sdp: str) -> tuple[int, str, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body: str | aiohttp.FormData = sdp
        if self._session is None:
            headers["Content-Type"] = "application/sdp"
        else:
            body = aiohttp.FormData(default_to_multipart=True)
            body.add_field("sdp", sdp)
            body.add_field("session", json.dumps(self._session))
        url = self.base_url + "/v1/realtime/calls"
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
            return r.status, await r.text(), dict(r.headers)


async def mint(server: Server, key: str | None, body: dict) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/realtime/client_secrets", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize("token", [None, "sk-wrong", "ek_forged_secret", "Basic abc"])
async def test_calls_without_a_valid_key_get_401(locked: Server, token: str | None) -> None:
    peer = KeyedPeer(locked.url, token)
    with pytest.raises(CallRefused) as refused:
        await peer.connect()
    assert refused.value.status == 401
    assert "invalid_api_key" in refused.value.body
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    assert len(locked.registry) == 0


async def test_a_server_key_makes_a_call_and_hangs_up(locked: Server) -> None:
    peer = KeyedPeer(locked.url, KEY)
    try:
        await peer.connect()
        assert peer.call_url is not None
        async with aiohttp.ClientSession() as http:
            async with http.post(peer.call_url + "/hangup") as resp:
                assert resp.status == 401
            # Another key of the server cannot end a call it did not make.
            other = {"Authorization": "Bearer sk-other"}
            async with http.post(peer.call_url + "/hangup", headers=other) as resp:
                assert resp.status == 403 and "not_call_owner" in await resp.text()
            assert len(locked.registry) == 1
            headers = {"Authorization": f"Bearer {KEY}"}
            async with http.post(peer.call_url + "/hangup", headers=headers) as resp:
                assert resp.status == 200
    finally:
        await peer.close()


async def test_client_secret_carries_its_session_and_works_until_it_expires(
    locked: Server,
) -> None:
    status, _ = await mint(locked, None, {})
    assert status == 401
    status, secret = await mint(locked, KEY, {"session": {"instructions": "Be brief."}})
    assert status == 200 and secret["value"].startswith("ek_")
    assert secret["expires_at"] > time.time() and secret["session"]["instructions"] == "Be brief."
    # The whole session its call gets, as GA answers (it was the patch alone).
    session = secret["session"]
    assert (session["type"], session["object"]) == ("realtime", "realtime.session")
    assert session["audio"]["output"]["voice"] and session["output_modalities"] == ["audio"]
    status, refused = await mint(locked, KEY, {"session": {"type": "transcription"}})
    assert status == 400 and "type" in refused["error"]["message"]
    huge = {"session": {"instructions": "x" * 300_000}}
    status, refused = await mint(locked, KEY, huge)
    assert status == 413 and refused["error"]["code"] == "request_too_large"
    # The client tries to widen the session: the secret's session wins. As OpenAI's, the
    # secret makes calls until it expires (a client that reconnects with it is let in).
    peers = [
        KeyedPeer(locked.url, secret["value"], session={"instructions": "Say anything."}),
        KeyedPeer(locked.url, secret["value"]),
    ]
    try:
        for peer in peers:
            await peer.connect()
            created = await peer.next_event("session.created")
            assert created["session"]["instructions"] == "Be brief."
        assert len(locked.registry) == 2
    finally:
        await asyncio.gather(*(p.close() for p in peers))


async def test_a_single_use_client_secret_makes_one_call(start_server: StartServer) -> None:
    server = await start_server(api_keys=(KEY,), single_use_client_secrets=True)
    _, secret = await mint(server, KEY, {"session": {"instructions": "Be brief."}})
    # An offer that makes no call (here not SDP; a full server alike) leaves it usable.
    status, body, _ = await KeyedPeer(server.url, secret["value"])._post_offer("not an offer")
    assert status == 400 and "invalid_offer" in body
    peer = KeyedPeer(server.url, secret["value"])
    try:
        await peer.connect()
        created = await peer.next_event("session.created")
        assert created["session"]["instructions"] == "Be brief."
    finally:
        await peer.close()
    again = KeyedPeer(server.url, secret["value"])
    with pytest.raises(CallRefused) as refused:
        await again.connect()
    assert refused.value.status == 401


async def test_without_keys_a_minted_secret_still_carries_its_session(
    start_server: StartServer,
) -> None:
    """A server with no keys lets any token in (a stock client insists on one that starts with
    ``ek_``), but a secret an app backend minted still gives the call its session (it was
    ignored)."""
    server = await start_server()
    status, secret = await mint(server, None, {"session": {"instructions": "Be brief."}})
    assert status == 200
    for token, instructions in ((secret["value"], "Be brief."), ("ek_anything", None)):
        peer = KeyedPeer(server.url, token)
        try:
            await peer.connect()
            created = await peer.next_event("session.created")
            assert (created["session"]["instructions"] == "Be brief.") == bool(instructions)
        finally:
            await peer.close()


async def test_an_expired_client_secret_is_refused(
    locked: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await mint(locked, KEY, {"expires_after": {"anchor": "created_at", "seconds": 10}})
    later = time.time() + 11
    monkeypatch.setattr(time, "time", lambda: later)
    peer = KeyedPeer(locked.url, secret["value"])
    with pytest.raises(CallRefused) as refused:
        await peer.connect()
    assert refused.value.status == 401


async def test_origins_outside_the_allow_list_get_403(locked: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for origin, status in (("https://evil.example", 403), ("https://app.example", 401)):
            async with http.post(
                locked.url + "/v1/realtime/calls", data="v=0",
                headers={"Origin": origin, "Content-Type": "application/sdp"},
            ) as resp:  # fmt: skip
                assert resp.status == status, origin
        async with http.get(locked.url + "/healthz") as resp:
            assert resp.status == 200  # health and the page need no key
        async with http.get(locked.url + "/") as resp:
            assert resp.status == 200


async def test_the_app_backend_watches_and_steers_its_call_over_the_sideband(
    start_server: StartServer,
) -> None:
    server = await start_server(model="local", api_keys=(KEY, "sk-other"))
    peer = KeyedPeer(server.url, KEY, session={"audio": {"input": {"turn_detection": None}}})
    try:
        await peer.connect()
        await peer.next_event("session.created")
        call_id = peer.call_url.rsplit("/", 1)[1]
        url = server.url + f"/v1/realtime?call_id={call_id}"
        async with aiohttp.ClientSession() as http:
            for key, status in (("sk-other", 403), ("sk-nope", 401)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url, headers={"Authorization": f"Bearer {key}"})
                assert refused.value.status == status
            with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
                await http.ws_connect(server.url + "/v1/realtime?call_id=rtc_none",
                                      headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
            assert missing.value.status == 404
            # At most 4 at once (each may hold 16 MiB of events a backend does not read).
            auth = {"Authorization": f"Bearer {KEY}"}
            extra = [await http.ws_connect(url, headers=auth) for _ in range(4)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as crowded:
                await http.ws_connect(url, headers=auth)
            assert crowded.value.status == 429
            await extra.pop().close()  # one goes: there is room again
            async with http.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
                # Steering from the backend: the caller hears the reply it asked for.
                await ws.send_json(
                    {
                        "type": "response.create",
                        "response": {"instructions": 'Say "from the backend"'},
                    }
                )
                seen = []
                async with asyncio.timeout(20):
                    async for message in ws:
                        seen.append(json.loads(message.data)["type"])
                        if seen[-1] == "response.done":
                            break
                assert "response.created" in seen
                done = await peer.next_event("response.done", timeout=5)
                assert (
                    done["response"]["output"][0]["content"][0]["transcript"] == "from the backend"
                )
                # The call ending closes the sideband.
                await peer.close()
                async with asyncio.timeout(10):
                    async for _ in ws:
                        pass
                assert ws.closed
    finally:
        await peer.close()


async def test_limits_per_key_duration_and_event_rate(start_server: StartServer) -> None:
    server = await start_server(api_keys=(KEY,), max_calls_per_key=1, max_call_s=3.0,
                                max_events_per_s=5)  # fmt: skip
    first = KeyedPeer(server.url, KEY)
    second = KeyedPeer(server.url, KEY)
    try:
        await first.connect()
        await first.next_event("session.created")
        with pytest.raises(CallRefused) as refused:
            await second.connect()
        assert refused.value.status == 429 and "too_many_calls" in refused.value.body
        # 10 go through (a 2 s burst), 4 are refused: 0.8 s past the limit, not yet a flood.
        for i in range(14):
            first.send({"type": "session.update", "event_id": f"u{i}", "session": {}})
        limited = await first.next_event("error", timeout=5)
        assert limited["error"]["code"] == "rate_limited"
        after = first.events.index(limited) + 1
        while (ended := await first.next_event("error", after=after, timeout=5))["error"][
            "code"
        ] == "rate_limited":
            after = first.events.index(ended) + 1
        assert ended["error"]["code"] == "call_duration_limit"
        async with asyncio.timeout(5):
            while len(server.registry):  # noqa: ASYNC110 - the registry has no event to await
                await asyncio.sleep(0.05)
    finally:
        await first.close()
        await second.close()


async def test_keyless_calls_made_with_client_secrets_share_no_per_key_limit(
    start_server: StartServer,
) -> None:
    """Without keys a minted secret has no key to count against: two browsers' calls made with
    secrets are not one "key" (the second got 429 with --max-calls-per-key 1, while calls made
    without a secret, and every call with --workers, were never limited)."""
    server = await start_server(max_calls_per_key=1)
    peers = []
    try:
        for _ in range(2):
            status, secret = await mint(server, None, {})
            assert status == 200
            peer = KeyedPeer(server.url, secret["value"])
            peers.append(peer)
            await peer.connect()
            await peer.next_event("session.created")
        assert len(server.registry) == 2
    finally:
        for peer in peers:
            await peer.close()


async def test_a_client_that_keeps_flooding_is_cut_off(start_server: StartServer) -> None:
    server = await start_server(max_events_per_s=5)
    flooder, bystander = Peer(server.url), Peer(server.url)
    try:
        await asyncio.gather(flooder.connect(), bystander.connect())
        await flooder.next_event("session.created")
        await bystander.next_event("session.created")
        for i in range(60):
            flooder.send({"type": "session.update", "event_id": f"u{i}", "session": {}})
        errors: list[dict[str, Any]] = []
        after = 0
        async with asyncio.timeout(10):
            while not errors or "ended" not in errors[-1]["error"]["message"]:
                errors.append(await flooder.next_event("error", after=after))
                after = flooder.events.index(errors[-1]) + 1
        # One error while events are dropped, then the one that ends the call; not one each.
        assert [e["error"]["code"] for e in errors] == ["rate_limited", "rate_limited"]
        async with asyncio.timeout(10):
            while len(server.registry) > 1:  # noqa: ASYNC110 - the registry has no event to await
                await asyncio.sleep(0.05)
        # The other call goes on.
        mark = len(bystander.events)
        bystander.send({"type": "session.update", "session": {}})
        await bystander.next_event("session.updated", after=mark, timeout=5)
    finally:
        await flooder.close()
        await bystander.close()


async def test_a_sideband_that_floods_is_cut_off_and_the_call_goes_on(
    start_server: StartServer,
) -> None:
    """An app backend's events have limits of their own: its burst costs the caller none of
    theirs, and a backend that keeps flooding loses its sideband (1008), not the call."""
    server = await start_server(api_keys=(KEY,), max_events_per_s=5)
    peer = KeyedPeer(server.url, KEY)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        url = server.url + f"/v1/realtime?call_id={peer.call_id}"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            for i in range(60):
                await ws.send_json({"type": "session.update", "event_id": f"s{i}", "session": {}})
            async with asyncio.timeout(10):
                async for _ in ws:
                    pass
            assert ws.close_code == 1008
        # The caller's own events are untouched by it, and the call is up.
        mark = len(peer.events)
        for i in range(8):
            peer.send({"type": "session.update", "event_id": f"c{i}", "session": {}})
        for _ in range(8):
            mark = peer.events.index(await peer.next_event("session.updated", after=mark)) + 1
        assert len(server.registry) == 1
    finally:
        await peer.close()


async def test_a_sideband_that_does_not_read_is_cut_off_by_bytes_not_only_by_count(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller retrieves a 200 kB item again and again while the app backend reads nothing:
    its backlog is capped in bytes (lowered here from 16 MiB to 1 MiB), so it loses its
    sideband (1011) long before 1,024 such events (200 MB) wait for it. The call goes on."""
    from s2s.signaling import sideband

    monkeypatch.setattr(sideband, "_SIDEBAND_BACKLOG_BYTES", 1 << 20)
    server = await start_server(api_keys=(KEY,))
    peer = KeyedPeer(server.url, KEY)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        session = server.registry.get(peer.call_id)
        assert session is not None
        url = server.url + f"/v1/realtime?call_id={peer.call_id}"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            peer.send({"type": "conversation.item.create", "item": {
                "id": "big", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "x" * 200_000}],
            }})  # fmt: skip
            await peer.next_event("conversation.item.done")
            # Until the backend is dropped; the sockets between hold a few MB before the backlog
            # grows, and 150 events (30 MB) is far past both but far short of 1,024.
            retrieved = 0
            while session.listeners and retrieved < 150:
                mark = len(peer.events)
                peer.send({"type": "conversation.item.retrieve", "item_id": "big"})
                await peer.next_event("conversation.item.retrieved", after=mark)
                retrieved += 1
            assert not session.listeners, f"still attached after {retrieved} events of 200 kB"
            # What was queued still arrives, then the close.
            got = []
            async with asyncio.timeout(10):
                async for message in ws:
                    got.append(json.loads(message.data)["type"])
            assert ws.close_code == 1011
            assert 0 < got.count("conversation.item.retrieved") < retrieved
        mark = len(peer.events)
        peer.send({"type": "session.update", "session": {}})
        await peer.next_event("session.updated", after=mark)
    finally:
        await peer.close()


async def test_past_the_live_secrets_cap_minting_is_429_not_500(
    locked: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s2s import auth

    monkeypatch.setattr(auth, "_MAX_LIVE_SECRETS", 2)
    statuses = [(await mint(locked, KEY, {}))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, body = await mint(locked, KEY, {})
    assert body["error"]["code"] == "too_many_client_secrets"


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "shared"])
def test_live_secrets_are_capped_in_bytes_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: bool
) -> None:
    """Live secrets' sessions are capped in bytes as well as in number (10,000 of 256 KiB each
    were 2.5 GB), in one process and as the workers of one server keep them."""
    from s2s import auth

    monkeypatch.setattr(auth, "_MAX_LIVE_BYTES", 250_000)
    keys = auth.Keys((KEY,), tmp_path if workers else None)
    big = msgspec.convert({"instructions": "x" * 100_000}, auth.SessionPatch)
    for _ in range(2):
        keys.mint(KEY, big, 60)
    with pytest.raises(OverflowError):
        keys.mint(KEY, big, 60)
    keys.mint(KEY, msgspec.convert({}, auth.SessionPatch), 60)  # a small one still fits
