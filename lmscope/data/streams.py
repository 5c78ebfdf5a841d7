"""Line streams over plain, gzip and zstd files, in constant memory, that notice truncation.

``zstandard``'s own stream reader stops quietly at the end of a truncated file;
:class:`ZstdRawReader` decompresses frame by frame and fails when the file ends
inside a frame. ``gzip`` already fails on a truncated member. Every failure is
turned into one :class:`~lmscope.errors.LmscopeError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

from lmscope.errors import LmscopeError

_READ_BYTES = 1 << 17


class CorruptStreamError(Exception):
    """A compressed stream that ends early or holds bytes that are not what its format promises."""


class ZstdRawReader(io.RawIOBase):
    """A raw binary stream of the decompressed content of a (possibly multi-frame) ``.zst`` file.

    Raises :class:`CorruptStreamError` when the file ends inside a frame (truncated) and
    ``zstandard.ZstdError`` on bytes that are not zstd.
    """

    def __init__(self, compressed: io.BufferedIOBase) -> None:
        super().__init__()
        self._source = compressed
        self._context = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._pending = b""
        self._position = 0
        self._exhausted = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._position >= len(self._pending) and not self._exhausted:
            self._fill()
        available = len(self._pending) - self._position
        count = min(len(buffer), available)
        buffer[:count] = self._pending[self._position : self._position + count]
        self._position += count
        return count

    def _fill(self) -> None:
        data = self._source.read(_READ_BYTES)
        if not data:
            if self._frame is not None:
                raise CorruptStreamError("it ends in the middle of a zstd frame (the file is truncated)")
            self._exhausted = True
            return
        produced: list[bytes] = []
        while data:
            if self._frame is None:
                self._frame = self._context.decompressobj()
            produced.append(self._frame.decompress(data))
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""
        self._pending = b"".join(produced)
        self._position = 0


def compression_of(path: Path) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` from the file name's last suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return "gzip"
    if suffix in {".zst", ".zstd"}:
        return "zstd"
    return None


def iter_lines(path: Path) -> Iterator[bytes]:
    """Yield the lines of a plain, ``.gz`` or ``.zst`` file as bytes, line ending included.

    Memory stays constant apart from the longest line. A truncated or corrupt file
    raises :class:`LmscopeError` naming the file and what is wrong, after the lines
    that could be read.
    """
    compression = compression_of(path)
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise LmscopeError(f"{path} could not be opened ({err.strerror or err}); check the path and its permissions.") from None
    with raw:
        try:
            if compression == "gzip":
                stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb")
            elif compression == "zstd":
                stream = io.BufferedReader(ZstdRawReader(raw), buffer_size=1 << 20)
            else:
                stream = raw
            yield from stream
        except EOFError:
            raise LmscopeError(f"{path} is a truncated {compression} file (it ends before the end-of-stream marker); re-create or re-download it.") from None
        except CorruptStreamError as err:
            raise LmscopeError(f"{path} is corrupt: {err}; re-create or re-download it.") from None
        except (gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as err:
            raise LmscopeError(f"{path} is not a valid {compression} file ({err}); re-create or re-download it.") from None
        except OSError as err:
            raise LmscopeError(f"{path} could not be read ({err.strerror or err}); check the file.") from None


def read_all(path: Path) -> bytes:
    """The whole (decompressed) content of a plain, ``.gz`` or ``.zst`` file."""
    return b"".join(iter_lines(path))
