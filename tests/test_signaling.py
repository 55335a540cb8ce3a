"""HTTP paths of call set-up against the real aiohttp server."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Server, StartServer
from tests.peer import CallRefused, Peer

CALLS = "/v1/realtime/calls"


async def offer(audio: str | None) -> str:
    """An aiortc peer's SDP offer with the events channel and, unless None, audio of that
    direction."""
    from s2s.rtc import new_peer_connection

    pc = new_peer_connection()
    if audio is not None:
        pc.addTransceiver("audio", direction=audio)
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    return str(pc.localDescription.sdp)


async def post(url: str, body: Any, **headers: str):
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        text = await r.text()
        return r.status, r.headers, text


@pytest.mark.parametrize(
    "body",
    [
        "",
        "hello",
        "v=0\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        "v=0\r\nm=audio nonsense\r\n\x00\x01",
    ],
    ids=["empty", "text", "bare-version", "no-ice-no-dtls", "garbage-m-line"],
)
async def test_malformed_offer_is_400_with_json_error(server: Server, body: str) -> None:
    status, headers, text = await post(
        server.url + CALLS, body, **{"Content-Type": "application/sdp"}
    )
    assert status == 400, text
    assert headers["Content-Type"].startswith("application/json")
    error = (await _json(text))["error"]
    assert error["code"] == "invalid_offer"
    assert error["message"]
    assert len(server.registry) == 0


async def test_offer_without_audio_is_400(server: Server) -> None:
    status, _, text = await post(
        server.url + CALLS, await offer(None), **{"Content-Type": "application/sdp"}
    )
    assert status == 400
    assert "no audio" in (await _json(text))["error"]["message"]
    assert len(server.registry) == 0


async def test_an_offer_of_many_sections_or_candidates_is_refused_and_extra_mics_unused(
    server: Server,
) -> None:
    """One microphone is heard: a second and third audio section are answered inactive (each
    would decode into a queue nothing reads, on a thread of its own, all call long); past 8
    sections or 64 distinct candidates an offer is refused before it is parsed."""
    from s2s.rtc import new_peer_connection

    pc = new_peer_connection()
    for _ in range(3):
        pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    await pc.close()
    sdp = str(pc.localDescription.sdp)
    status, answered, text = await post(
        server.url + CALLS, sdp, **{"Content-Type": "application/sdp"}
    )
    assert status == 201, text
    audio = [section for section in text.split("m=")[1:] if section.startswith("audio")]
    assert len(audio) == 3 and "a=sendrecv" in audio[0]
    assert all("a=inactive" in section for section in audio[1:])
    hung, _, _ = await post(server.url + answered["Location"] + "/hangup", b"")
    assert hung == 200
    sections = sdp + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 6
    candidates = sdp + "".join(
        f"a=candidate:{i} 1 udp 1 10.0.{i}.1 9 typ host\r\n" for i in range(65)
    )
    # Unbundled, each section checks its own candidates: they count in every section.
    unbundled = (
        "".join(line + "\r\n" for line in sdp.splitlines() if not line.startswith("a=group:BUNDLE"))
        + "".join(f"a=candidate:{i} 1 udp 1 10.0.{i}.1 9 typ host\r\n" for i in range(40)) * 2
    )
    for body in (sections, candidates, unbundled):
        status, _, text = await post(
            server.url + CALLS, body, **{"Content-Type": "application/sdp"}
        )
        error = (await _json(text))["error"]
        assert status == 400 and error["code"] == "invalid_offer" and "at most" in error["message"]
    assert len(server.registry) == 0


@pytest.mark.parametrize("direction", ["sendonly", "inactive"])
async def test_offer_whose_audio_cannot_come_back_is_400(server: Server, direction: str) -> None:
    """The model's audio goes back on the offer's audio (and paces every response's end), so an
    offer that sends audio without taking any back is refused at once, not left hanging."""
    status, _, text = await post(
        server.url + CALLS, await offer(direction), **{"Content-Type": "application/sdp"}
    )
    assert status == 400, text
    assert f"audio is {direction}" in (await _json(text))["error"]["message"]
    assert len(server.registry) == 0


async def test_wrong_content_type_is_415(server: Server) -> None:
    status, _, text = await post(server.url + CALLS, "v=0", **{"Content-Type": "text/plain"})
    assert status == 415
    assert (await _json(text))["error"]["code"] == "unsupported_media_type"


async def test_the_offer_as_each_openai_sdk_posts_it_is_answered(server: Server) -> None:
    """openai-node's multipart parts typed application/sdp and application/json (aiohttp hands
    those over as bytes: they were refused as missing), openai-python's JSON body, and a JSON
    body with a bad session (400)."""
    session = {"type": "realtime", "instructions": "Be brief."}
    typed = aiohttp.FormData(default_to_multipart=True)
    typed.add_field("sdp", await offer("sendrecv"), content_type="application/sdp")
    typed.add_field("session", json.dumps(session), content_type="application/json")
    as_json = json.dumps({"sdp": await offer("sendrecv"), "session": session})
    for body, headers in ((typed, {}), (as_json, {"Content-Type": "application/json"})):
        status, answered, text = await post(server.url + CALLS, body, **headers)
        assert status == 201, text
        assert "m=audio" in text and answered["Location"].startswith(CALLS + "/rtc_")
        call = server.registry.get(answered["Location"].rsplit("/", 1)[1])
        assert call is not None and call.config.instructions == "Be brief."
        hung, _, _ = await post(server.url + answered["Location"] + "/hangup", b"")
        assert hung == 200
    bad = json.dumps({"sdp": await offer("sendrecv"), "session": {"instructions": 42}})
    status, _, text = await post(server.url + CALLS, bad, **{"Content-Type": "application/json"})
    assert status == 400 and (await _json(text))["error"]["code"] == "invalid_session"
    status, _, text = await post(server.url + CALLS, "[]", **{"Content-Type": "application/json"})
    assert status == 400 and (await _json(text))["error"]["code"] == "missing_sdp"


async def test_oversized_offer_is_413(start_server: StartServer) -> None:
    server = await start_server(max_sdp_bytes=1000)
    big = "v=0\r\n" + "a=x\r\n" * 400
    status, _, _ = await post(server.url + CALLS, big, **{"Content-Type": "application/sdp"})
    assert status == 413

    # In a form sent chunked (no Content-Length to refuse it by), and as JSON.
    async def chunks() -> AsyncIterator[bytes]:
        yield big.encode()

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("sdp", chunks(), content_type="application/sdp")
    status, _, text = await post(server.url + CALLS, form)
    assert status == 413, text
    as_json = json.dumps({"sdp": big})
    status, _, _ = await post(server.url + CALLS, as_json, **{"Content-Type": "application/json"})
    assert status == 413


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "urlencoded"])
async def test_form_without_sdp_or_with_bad_session_is_400(server: Server, multipart: bool) -> None:
    form = aiohttp.FormData(default_to_multipart=multipart)
    form.add_field("session", "{}")
    status, _, text = await post(server.url + CALLS, form)
    assert status == 400 and (await _json(text))["error"]["code"] == "missing_sdp"

    form = aiohttp.FormData(default_to_multipart=multipart)
    form.add_field("sdp", "v=0\r\n")
    form.add_field("session", '{"instructions": 42}')
    status, _, text = await post(server.url + CALLS, form)
    error = (await _json(text))["error"]
    assert status == 400 and error["code"] == "invalid_session"
    assert "instructions" in error["message"]


async def test_hangup_of_unknown_call_is_404(server: Server) -> None:
    status, _, text = await post(server.url + CALLS + "/rtc_nope/hangup", b"")
    assert status == 404
    assert (await _json(text))["error"]["code"] == "call_not_found"


async def test_calls_past_the_limit_get_503_with_retry_after(start_server: StartServer) -> None:
    server = await start_server(max_sessions=2)
    peers = [Peer(server.url) for _ in range(3)]
    try:
        await peers[0].connect()
        await peers[1].connect()
        with pytest.raises(CallRefused) as refused:
            await peers[2].connect()
        assert refused.value.status == 503
        assert refused.value.headers["Retry-After"] == "5"
        assert "server_full" in refused.value.body
        # A freed slot is usable again.
        assert await peers[0].hangup() == 200
        third = Peer(server.url)
        peers.append(third)
        await third.connect()
    finally:
        for peer in peers:
            await peer.close()


async def test_cors_preflight_and_exposed_location(server: Server) -> None:
    origin = "http://localhost:5173"  # a local dev server's page (a keyless s2s takes no other)
    async with aiohttp.ClientSession() as http:
        async with http.options(
            server.url + CALLS,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                # openai-node in a browser adds its own headers to whatever it calls
                "Access-Control-Request-Headers": "authorization,content-type,"
                "x-openai-agents-sdk, x-stainless-os,openai-organization",
            },
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == origin
            allowed = {
                h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")
            }
            for header in ("authorization", "content-type", "x-openai-agents-sdk",
                           "x-stainless-os", "openai-organization"):  # fmt: skip
                assert header in allowed
        bad = "x-a;b"  # not a list of header names: the fixed list alone
        async with http.options(server.url + CALLS, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": bad,
        }) as r:  # fmt: skip
            assert r.status == 204 and "x-a" not in r.headers["Access-Control-Allow-Headers"]
        peer = Peer(server.url)
        try:
            await peer.connect()
        finally:
            await peer.close()
        async with http.post(server.url + CALLS + "/rtc_x/hangup", headers={"Origin": origin}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == origin
            assert "Location" in r.headers["Access-Control-Expose-Headers"]


async def test_without_keys_pages_of_other_sites_and_rebound_names_are_refused(
    server: Server,
) -> None:
    """A keyless server is its machine's: a page of another site (which any page its user
    opens could be) may not make calls, watch one over the sideband or hang one up, and a Host
    that is not loopback (DNS rebinding) is refused; programs (no Origin), the server's own
    page and local dev servers go on, and /metrics answers no other origin's page."""
    evil = {"Origin": "https://evil.example"}
    sdp = {"Content-Type": "application/sdp"}
    async with aiohttp.ClientSession() as http:
        for headers, code in (
            (evil, "origin_not_allowed"),
            ({"Origin": "null"}, "origin_not_allowed"),
            ({"Host": "evil.example:80", "Origin": "http://evil.example:80"}, "host_not_allowed"),
            ({"Host": "localhost:99999"}, "host_not_allowed"),  # malformed: refused, not a 500
            ({"Origin": "http://[::1"}, "origin_not_allowed"),
        ):
            status, _, text = await post(server.url + CALLS, "v=0", **headers, **sdp)
            assert status == 403 and (await _json(text))["error"]["code"] == code, headers
        status, _, _ = await post(server.url + CALLS + "/rtc_x/hangup", b"", **evil)
        assert status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.url + "/v1/realtime?call_id=rtc_x", headers=evil)
        assert refused.value.status == 403
        for headers in (
            {},
            {"Origin": server.url},
            {"Origin": "http://127.0.0.1:3000"},
            {"Host": "[::1]:8080", "Origin": "http://[::1]:8080"},
        ):
            status, _, text = await post(server.url + CALLS, "v=0", **headers, **sdp)
            assert status == 400 and (await _json(text))["error"]["code"] == "invalid_offer"
        async with http.get(server.url + "/metrics", headers=evil) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_answer_is_201_with_location_and_sdp(server: Server) -> None:
    peer = Peer(server.url)
    try:
        await peer.connect()
        assert peer.call_url is not None
        call_id = peer.call_url.rsplit("/", 1)[1]
        assert call_id.startswith("rtc_")
        assert server.registry.get(call_id) is not None
    finally:
        await peer.close()


async def test_healthz(server: Server) -> None:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as r:
        body = await r.json()
    assert r.status == 200
    assert body.pop("tasks") > 0
    assert body == {"status": "ok", "model": "echo", "calls": 0, "max_calls": 32}


async def test_web_page_is_served(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/") as r:
            assert r.status == 200
            assert "oai-events" not in await r.text()  # the page's logic lives in the module
        async with http.get(server.url + "/web/app.js") as r:
            assert r.status == 200
            assert "oai-events" in await r.text()


async def _json(text: str) -> dict:
    import json

    return json.loads(text)


async def test_an_offer_that_arrives_in_pieces_is_read_whole(server: Server) -> None:
    """An offer often crosses the network in several segments: the server reads it all (it
    read what the first brought, and refused or half-read the rest)."""
    sdp = (await offer("sendrecv")).encode()

    async def in_pieces() -> AsyncIterator[bytes]:
        half = len(sdp) // 2
        yield sdp[:half]
        await asyncio.sleep(0.05)  # the second segment comes later, as over a real network
        yield sdp[half:]

    status, _, text = await post(
        server.url + CALLS, in_pieces(), **{"Content-Type": "application/sdp"}
    )
    assert status == 201, text
    assert "a=mid:" in text and len(server.registry) == 1


async def raw_request(server: Server, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send ``head`` (and ``body``) as they are, on a connection of its own; the status and
    JSON error of the answer."""
    port = int(server.url.rsplit(":", 1)[1].rstrip("/"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        async with asyncio.timeout(10):  # not to the end: aiohttp lingers for a body's rest
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", answer)[1])  # type: ignore[index]
            payload = await reader.readexactly(length)
    finally:
        writer.close()
    assert re.search(rb"(?i)content-type: *application/json", answer), answer
    return int(answer.split()[1]), json.loads(payload)


async def test_a_body_that_stalls_is_408_and_its_handler_let_go(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s2s.signaling import calls

    monkeypatch.setattr(calls, "BODY_TIMEOUT_S", 0.5)
    for path, ctype in ((CALLS, "application/sdp"), (CALLS, "multipart/form-data; boundary=b"),
                        ("/v1/realtime/client_secrets", "application/json")):  # fmt: skip
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                "Content-Length: 5000\r\nConnection: close").encode()  # fmt: skip
        status, body = await raw_request(server, head, b"v=0\r\n")  # and then nothing
        assert (status, body["error"]["code"]) == (408, "request_timeout"), path


async def test_broken_headers_and_bodies_get_json_errors_not_500(start_server: StartServer) -> None:
    server = await start_server(api_keys=("sk-signaling",))
    for path in (CALLS, "/v1/realtime/client_secrets"):  # a token of bytes that are not UTF-8
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
        status, body = await raw_request(server, head + b"Authorization: Bearer \xff\xfe")
        assert (status, body["error"]["code"]) == (401, "invalid_api_key"), path
    key = "Authorization: Bearer sk-signaling"
    for part_head in (b"no colon here", b"Content-Transfer-Encoding: foo",
                      b'Content-Type: text/plain; charset=nope'):  # fmt: skip
        form = (b"--b\r\nContent-Disposition: form-data; name=\"sdp\"\r\n" + part_head
                + b"\r\n\r\nv=0\r\n--b--\r\n")  # fmt: skip
        head = (f"POST {CALLS} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{key}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {len(form)}").encode()  # fmt: skip
        status, body = await raw_request(server, head, form)
        assert status == 400 and body["error"]["code"] in ("invalid_body", "invalid_offer")
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-signaling"}) as http:
        async with http.get(server.url + "/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.delete(server.url + CALLS) as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
            assert "POST" in r.headers["Allow"]


@pytest.mark.parametrize("broken", ["no-fingerprint", "no-known-codec"])
async def test_an_offer_no_call_could_come_of_is_400(server: Server, broken: str) -> None:
    """An offer with no DTLS fingerprint, or whose audio has no codec s2s speaks, is refused
    (each was answered 201, and the call held its place until the peer timeout)."""
    sdp = await offer("sendrecv")
    if broken == "no-fingerprint":
        sdp = re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", sdp)
    else:
        sdp = re.sub(r"a=(rtpmap|fmtp|rtcp-fb):[^\r\n]*\r\n", "", sdp)
        sdp = re.sub(r"(m=audio \S+ \S+)( \d+)+", r"\1 96", sdp)
    status, _, text = await post(server.url + CALLS, sdp, **{"Content-Type": "application/sdp"})
    assert status == 400, text
    assert (await _json(text))["error"]["code"] == "invalid_offer"
    assert len(server.registry) == 0
