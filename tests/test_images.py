"""Images on the data channel: chunked uploads, validation, and the model using the picture."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import struct
import threading
import zlib
from collections.abc import Iterable

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, StartServer
from tests.peer import ColourCamera, MicTrack, Peer

CHUNK = 150_000  # bytes of image per chunk: ~200 KB of base64, under the 256 KiB message cap


def photo(rgb: tuple[int, int, int], size: tuple[int, int], *, noise: int = 60) -> bytes:
    """A noisy JPEG around ``rgb`` (noise makes it big, as camera frames are)."""
    rng = np.random.default_rng(0)
    pixels = np.clip(
        np.array(rgb, np.int16) + rng.integers(-noise, noise, (size[1], size[0], 3)), 0, 255
    ).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def bomb_png(side: int) -> bytes:
    """A PNG header claiming side x side pixels over a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side + 1) * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def send_chunks(peer: Peer, upload_id: str, data: bytes, indexes: Iterable[int]) -> None:
    total = math.ceil(len(data) / CHUNK)
    for index in indexes:
        piece = base64.b64encode(data[index * CHUNK : (index + 1) * CHUNK]).decode()
        peer.send({"type": "s2s.image.chunk", "upload_id": upload_id, "index": index,
                   "total": total, "data": piece})  # fmt: skip


def send_upload(peer: Peer, upload_id: str, data: bytes) -> None:
    send_chunks(peer, upload_id, data, range(math.ceil(len(data) / CHUNK)))
    peer.send({"type": "s2s.image.commit", "upload_id": upload_id})


def ask_what_is_seen(peer: Peer) -> None:
    text = {"type": "input_text", "text": "what am I looking at?"}
    item = {"type": "message", "role": "user", "content": [text]}
    peer.send({"type": "conversation.item.create", "item": item})
    peer.send({"type": "response.create"})


@pytest.fixture
async def local(start_server: StartServer) -> Server:
    return await start_server(model="local", image_upload_bytes=3_000_000)


async def test_a_big_photo_in_chunks_is_acknowledged_without_an_audio_gap_and_used(
    local: Server,
) -> None:
    data = photo((200, 30, 30), (1800, 1400))
    assert len(data) > 2_000_000
    peer = Peer(local.url, MicTrack(), session={"audio": {"input": {"turn_detection": None}}})
    try:
        await peer.connect()
        await peer.next_event("session.created")
        loop = asyncio.get_running_loop()
        await peer.wait_audio(0.3, since=loop.time())
        started = loop.time()
        send_upload(peer, "cam1", data)
        received = await peer.next_event("s2s.image.received", timeout=20)
        took = loop.time() - started
        assert received["width"] == 1800 and received["height"] == 1400
        assert received["bytes"] == len(data)
        await peer.wait_audio(0.3, since=loop.time())
        arrivals = [t for t, _ in peer.frames if started - 0.1 <= t <= loop.time()]
        gaps = np.diff(arrivals)
        # Caller and server share this test's event loop, and aiortc's SCTP is pure Python on both
        # ends, so the bound is loose; across processes (scripts/bench_image.py) the largest gap
        # while a 2 MB picture uploads is ~30 ms.
        assert gaps.max() < 0.25, f"audio stalled {gaps.max():.3f} s during a {took:.2f} s upload"
        item = await peer.next_event("conversation.item.added")
        assert item["item"]["id"] == received["item_id"]
        mark = len(peer.events)
        ask_what_is_seen(peer)
        done = await peer.next_event("response.done", after=mark, timeout=20)
        answer = done["response"]["output"][0]["content"][0]["transcript"]
        assert "1800 by 1400" in answer and "red" in answer
        # Events carry the picture by reference: it may not fit in one data-channel message.
        peer.send({"type": "conversation.item.retrieve", "item_id": received["item_id"]})
        kept = (await peer.next_event("conversation.item.retrieved", after=mark))["item"]
        assert kept["content"][0]["image_url"] == f"s2s:image/{received['item_id']}/0"
    finally:
        await peer.close()


async def test_bad_images_each_get_their_error_and_the_call_goes_on(
    start_server: StartServer,
) -> None:
    server = await start_server(model="local", image_upload_bytes=1_000_000,
                                image_max_pixels=20_000_000)  # fmt: skip
    peer = Peer(server.url, MicTrack(), session={"audio": {"input": {"turn_detection": None}}})
    good = photo((30, 30, 200), (200, 150))
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(png, "PNG")

    def as_item(data: bytes, mime: str = "jpeg") -> dict:
        url = f"data:image/{mime};base64," + base64.b64encode(data).decode()
        return {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": url}]}}  # fmt: skip

    cases = [
        (lambda: peer.send(as_item(good[: len(good) // 2])), "invalid_image"),
        (lambda: peer.send(as_item(b"GIF89a" + good[6:])), "unsupported_image_format"),
        (lambda: peer.send(as_item(bomb_png(30_000), "png")), "image_too_many_pixels"),
        (lambda: send_chunks(peer, "gap", photo((0, 0, 0), (600, 600), noise=120), [0, 2]),
         "image_chunk_out_of_order"),
        (lambda: peer.send({"type": "s2s.image.chunk", "upload_id": "nope", "index": 3,
                            "total": 5, "data": "AAAA"}), "image_unknown_upload"),
        (lambda: peer.send({"type": "s2s.image.commit", "upload_id": "never"}),
         "image_unknown_upload"),
        (lambda: send_chunks(peer, "huge", photo((9, 9, 9), (1400, 1400), noise=120), range(7)),
         "image_in_flight_limit"),
    ]  # fmt: skip
    try:
        await peer.connect()
        await peer.next_event("session.created")
        for send, code in cases:
            mark = len(peer.events)
            send()
            error = await peer.next_event("error", after=mark, timeout=10)
            assert error["error"]["code"] == code, (code, error)
        # Still served, and good images still work, by item and by upload.
        mark = len(peer.events)
        peer.send(as_item(png.getvalue(), "png"))
        await peer.next_event("conversation.item.added", after=mark)
        send_upload(peer, "ok", good)
        received = await peer.next_event("s2s.image.received", after=mark)
        assert received["width"] == 200
    finally:
        await peer.close()


async def test_a_video_track_is_sampled_and_its_latest_frame_answers(
    local: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampled frames are turned into pictures in the picture decoder's threads, as uploads
    are (they ran on the default executor, as many at once as calls had cameras)."""
    from s2s import images

    convert, threads = images.from_video_frame, set()

    def recorded(frame: object, limits: images.ImageLimits) -> images.Picture:
        threads.add(threading.current_thread().name)
        return convert(frame, limits)

    monkeypatch.setattr(images, "from_video_frame", recorded)
    camera = ColourCamera((40, 170, 60))
    peer = Peer(local.url, MicTrack(), camera=camera,
                session={"audio": {"input": {"turn_detection": None}}})  # fmt: skip
    try:
        await peer.connect()
        await peer.next_event("session.created")
        loop = asyncio.get_running_loop()
        # Two seconds of 30 fps video reach a server that keeps one frame a second.
        await peer.wait_audio(2.0, since=loop.time())
        assert camera.frames_sent > 30
        ask_what_is_seen(peer)
        done = await peer.next_event("response.done", timeout=20)
        answer = done["response"]["output"][0]["content"][0]["transcript"]
        assert "320 by 240" in answer and "green" in answer
        assert threads and all(n.startswith("s2s-images") for n in threads), threads
    finally:
        await peer.close()


class _StalledCamera(ColourCamera):
    """A camera that sends two frames, then nothing (a still screen share, a stalled camera):
    the second lets the server's video jitter buffer give out the first."""

    async def recv(self) -> av.VideoFrame:
        if self.frames_sent >= 2:
            await asyncio.Event().wait()
        return await super().recv()


async def test_a_cameras_last_frame_is_seen_though_no_frame_follows(local: Server) -> None:
    """A sampled frame becomes the call's picture once converted, not when the next frame
    comes: a camera that then sends nothing is still seen (it was not, till another frame)."""
    peer = Peer(local.url, MicTrack(), camera=_StalledCamera((40, 170, 60)),
                session={"audio": {"input": {"turn_detection": None}}})  # fmt: skip
    try:
        await peer.connect()
        await peer.next_event("session.created")
        answer = ""
        async with asyncio.timeout(30):  # asked again until the one frame has come and is seen
            while "green" not in answer:
                mark = len(peer.events)
                ask_what_is_seen(peer)
                done = await peer.next_event("response.done", after=mark, timeout=20)
                answer = done["response"]["output"][0]["content"][0]["transcript"]
        assert "320 by 240" in answer
    finally:
        await peer.close()


async def test_camera_frames_over_the_pixel_cap_are_skipped_with_one_error(
    start_server: StartServer,
) -> None:
    """A camera's frames are held to the pixel cap, as uploads are (a 9000x9000 frame took
    1.2 s and 1 GB to convert, every second of a call): they are skipped, the caller is told
    once, and the call goes on without a picture."""
    server = await start_server(model="local", image_max_pixels=320 * 240 - 1)
    camera = ColourCamera((40, 170, 60))
    peer = Peer(server.url, MicTrack(), camera=camera,
                session={"audio": {"input": {"turn_detection": None}}})  # fmt: skip
    try:
        await peer.connect()
        await peer.next_event("session.created")
        error = await peer.next_event("error", timeout=10)
        assert error["error"]["code"] == "image_too_many_pixels"
        assert "320x240" in error["error"]["message"]
        loop = asyncio.get_running_loop()
        # Two more seconds of video: two more frames sampled, and skipped without a word.
        await peer.wait_audio(2.0, since=loop.time())
        mark = len(peer.events)
        ask_what_is_seen(peer)
        done = await peer.next_event("response.done", after=mark, timeout=20)
        answer = done["response"]["output"][0]["content"][0]["transcript"]
        assert "no picture" in answer
        assert [e for e in peer.events if e["type"] == "error"] == [error]
    finally:
        await peer.close()


async def test_a_server_that_samples_no_video_keeps_a_call_that_sends_some(
    start_server: StartServer,
) -> None:
    """With ``--camera-fps 0`` a caller's camera is refused, and the call goes on (it ended
    with internal_error: aiortc hands the track over before the video is turned off)."""
    server = await start_server(model="local", camera_fps=0.0)
    peer = Peer(server.url, MicTrack(), camera=ColourCamera((40, 170, 60)),
                session={"audio": {"input": {"turn_detection": None}}})  # fmt: skip
    try:
        await peer.connect()
        await peer.next_event("session.created")
        loop = asyncio.get_running_loop()
        await peer.wait_audio(1.0, since=loop.time())
        mark = len(peer.events)
        peer.send({"type": "session.update", "session": {}})
        await peer.next_event("session.updated", after=mark, timeout=5)
        assert len(server.registry) == 1
        assert peer.answer is not None
        video = peer.answer[peer.answer.index("m=video") :]
        assert "a=inactive" in video.split("m=", 2)[1]  # the camera is refused in the answer
    finally:
        await peer.close()


def test_a_large_camera_frame_is_scaled_down_as_it_becomes_rgb() -> None:
    """A frame larger than ``max_side`` comes out that large at most, its shape and colour
    kept; one over the pixel cap is refused."""
    import av

    from s2s.images import ImageError, ImageLimits, from_video_frame

    pixels = np.empty((3000, 4000, 3), np.uint8)
    pixels[:] = (200, 30, 30)
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
    picture = from_video_frame(frame, ImageLimits())
    assert (picture.width, picture.height) == (4000, 3000)
    assert Image.open(io.BytesIO(picture.jpeg)).size == (1024, 768)
    assert "4000 by 3000" in picture.description and "red" in picture.description
    with pytest.raises(ImageError, match="4000x3000"):
        from_video_frame(frame, ImageLimits(max_pixels=4000 * 3000 - 1))


def _stored(image: Image.Image, kind: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def test_a_picture_is_taken_as_it_looks() -> None:
    """A phone's portrait photo, stored sideways with an EXIF orientation, is seen upright; a
    see-through PNG is seen on white; a 16-bit grey one keeps its greys."""
    from s2s.images import ImageLimits, load

    limits = ImageLimits()
    # Stored 200x100, left half red, to be turned a quarter clockwise (Orientation 6).
    stored = Image.new("RGB", (200, 100), (40, 80, 200))
    stored.paste((200, 30, 30), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = load(_stored(stored, "JPEG", exif=exif), limits)
    assert (upright.width, upright.height) == (100, 200)
    seen = Image.open(io.BytesIO(upright.jpeg))
    assert seen.size == (100, 200)
    top, bottom = seen.getpixel((50, 20)), seen.getpixel((50, 180))
    assert top[0] > 150 > bottom[0]  # the red half is on top once turned
    clear = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    assert (
        min(Image.open(io.BytesIO(load(_stored(clear, "PNG"), limits).jpeg)).getpixel((5, 5))) > 240
    )
    grey = Image.new("I;16", (64, 48), 32768)
    middle = Image.open(io.BytesIO(load(_stored(grey, "PNG"), limits).jpeg)).getpixel((5, 5))
    assert all(110 < c < 145 for c in middle)


def test_the_largest_picture_goes_in_one_burst_and_a_flood_is_still_one() -> None:
    """A call's byte allowance holds the largest picture's chunks sent flat out (the 2 s burst,
    2 MB, refused a 2 MB photo's end and ended the call over a 3 MB one); past that, pushing on
    is still cut off as a flood."""
    from s2s.config import Settings
    from s2s.eventrate import Verdict, event_rate

    settings = Settings()
    rate = event_rate(settings)
    chunk = 4 * CHUNK // 3 + 200  # one chunk message, base64 and its JSON
    chunks = math.ceil(settings.image_max_bytes / CHUNK)
    assert [rate.take(chunk) for _ in range(chunks)] == [Verdict.ACCEPT] * chunks
    verdicts = [rate.take(chunk) for _ in range(20)]
    assert Verdict.REFUSE in verdicts and verdicts[-1] == Verdict.FLOOD


async def test_pictures_decode_off_the_event_loop_two_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However many callers send pictures at once, two decode (each can take a core and
    340 MB), in the decoder's threads; the rest wait their turn and are then decoded."""
    from s2s import images

    decode, entered, gate = images.load, [], threading.Event()
    loop, arrived = asyncio.get_running_loop(), asyncio.Semaphore(0)

    def held(data: bytes, limits: images.ImageLimits) -> images.Picture:
        entered.append(threading.current_thread().name)
        loop.call_soon_threadsafe(arrived.release)
        gate.wait(10)
        return decode(data, limits)

    monkeypatch.setattr(images, "load", held)
    data, limits = photo((200, 40, 40), (64, 48)), images.ImageLimits()
    loads = [asyncio.ensure_future(images.load_async(data, limits)) for _ in range(4)]
    try:
        async with asyncio.timeout(5):
            for _ in range(2):
                await arrived.acquire()
        with pytest.raises(TimeoutError):  # a third decode would start here: none may
            async with asyncio.timeout(0.5):
                await arrived.acquire()
    finally:
        gate.set()
    async with asyncio.timeout(10):
        pictures = await asyncio.gather(*loads)
    assert [(p.width, p.height) for p in pictures] == [(64, 48)] * 4
    assert len(entered) == 4 and all(n.startswith("s2s-images") for n in entered), entered
