"""Chunked image uploads on the data channel (``s2s.image.chunk`` / ``s2s.image.commit``).

One ``Uploads`` per call holds the chunks of its unfinished uploads, capped in bytes across all
of them, so a client cannot make the server hold more than ``max_in_flight`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s2s.images import ImageError, decode_base64

_MAX_UPLOADS = 8


@dataclass(eq=False)
class _Upload:
    total: int
    chunks: list[bytes] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


class Uploads:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._uploads: dict[str, _Upload] = {}

    @property
    def in_flight(self) -> int:
        return sum(u.size for u in self._uploads.values())

    def chunk(self, upload_id: str, index: int, total: int, data: str) -> None:
        """Take chunk ``index`` of ``total``, or raise ``ImageError`` (the upload is dropped)."""
        upload = self._uploads.get(upload_id)
        if upload is None:
            if index != 0:
                raise ImageError(
                    "image_unknown_upload", f"no upload {upload_id!r} (chunk {index} before 0)"
                )
            if len(self._uploads) >= _MAX_UPLOADS:
                raise ImageError("image_too_many_uploads", f"at most {_MAX_UPLOADS} at a time")
            upload = self._uploads[upload_id] = _Upload(total)
        try:
            if total != upload.total:
                raise ImageError("image_chunk_mismatch", f"total changed to {total}")
            if index != len(upload.chunks):
                raise ImageError(
                    "image_chunk_out_of_order",
                    f"expected chunk {len(upload.chunks)} of {upload_id!r}, got {index}",
                )
            piece = decode_base64(data)
            if self.in_flight + len(piece) > self.max_in_flight:
                raise ImageError(
                    "image_in_flight_limit",
                    f"more than {self.max_in_flight} bytes of image uploads in flight",
                )
        except ImageError:
            del self._uploads[upload_id]
            raise
        upload.chunks.append(piece)

    def commit(self, upload_id: str) -> bytes:
        """The whole image of a finished upload, or raise ``ImageError``."""
        upload = self._uploads.pop(upload_id, None)
        if upload is None:
            raise ImageError("image_unknown_upload", f"no upload {upload_id!r}")
        if len(upload.chunks) != upload.total:
            raise ImageError(
                "image_incomplete", f"{len(upload.chunks)} of {upload.total} chunks arrived"
            )
        return b"".join(upload.chunks)
