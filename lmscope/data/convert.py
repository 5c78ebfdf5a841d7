"""Turn documentation files into plain text: reST/AsciiDoc sources as they are, HTML via html2text, man pages via ``man``.

:func:`convert_file` is the one entry point; it is a top-level function of a light
module so that a process pool can run it.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Converter = Literal["text", "html", "man"]

MAN_WIDTH = 80
_MAN_TIMEOUT_S = 120
_NAVIGATION = re.compile(rb'<div class="nav(?:header|footer)">.*?</div>', re.S)


@dataclass(frozen=True)
class Converted:
    """What became of one file.

    Attributes:
        text: the plain text, or ``None`` when the file yields no document.
        skipped: why there is no document: ``"alias"`` (a man page that only sources another),
            ``"empty"`` (no text after conversion) or ``"failed"``; ``None`` when there is one.
        detail: a short explanation for ``failed``.
        utf8_replaced: whether invalid UTF-8 was replaced by U+FFFD.
    """

    text: str | None
    skipped: str | None = None
    detail: str = ""
    utf8_replaced: bool = False


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def html_to_text(html: bytes) -> tuple[str, bool]:
    """Markdown-flavoured plain text of an HTML page (links, images and DocBook navigation bars dropped)."""
    import html2text

    source, replaced = _decode(_NAVIGATION.sub(b"", html))
    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_links = True
    converter.ignore_images = True
    converter.unicode_snob = True
    return converter.handle(source), replaced


def man_alias_target(roff: bytes) -> str | None:
    """The page a man page only sources (``.so man3/foo.3``), or ``None`` for a real page."""
    for line in roff.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith((b'.\\"', b"'\\\"", b'.\\#')):
            continue
        if stripped.startswith(b".so "):
            return stripped[4:].strip().decode("utf-8", errors="replace")
        return None
    return None


def man_command() -> str | None:
    """Path of the ``man`` program (man-db), or ``None``."""
    return shutil.which("man")


def render_man_page(path: Path, width: int = MAN_WIDTH) -> tuple[str, bool]:
    """Plain text of a man page file (``.gz`` or not), as ``man -l`` formats it, without bold/underline.

    Raises ``RuntimeError`` when ``man`` fails or prints nothing.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MANWIDTH": str(width),
        "MAN_DISABLE_SECCOMP": "1",
        "MANPAGER": "cat",
        "PAGER": "cat",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    command = [man_command() or "man", "--no-hyphenation", "--no-justification", "-E", "UTF-8", "-l", str(path)]
    result = subprocess.run(command, capture_output=True, env=env, timeout=_MAN_TIMEOUT_S, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        message = result.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise RuntimeError(message[-1] if message else f"man exited with status {result.returncode}")
    return _decode(result.stdout)


def convert_file(converter: Converter, path: Path) -> Converted:
    """Convert one file to plain text with ``converter`` (``text``, ``html`` or ``man``)."""
    try:
        if converter == "text":
            text, replaced = _decode(path.read_bytes())
        elif converter == "html":
            text, replaced = html_to_text(path.read_bytes())
        else:
            raw = path.read_bytes()
            roff = gzip.decompress(raw) if path.name.endswith(".gz") else raw
            target = man_alias_target(roff)
            if target is not None:
                return Converted(text=None, skipped="alias", detail=target)
            text, replaced = render_man_page(path)
    except (OSError, EOFError, RuntimeError, subprocess.SubprocessError, ValueError, zlib.error) as err:
        return Converted(text=None, skipped="failed", detail=f"{type(err).__name__}: {err}")
    text = text.strip("\n")
    if not text.strip():
        return Converted(text=None, skipped="empty")
    return Converted(text=text + "\n", utf8_replaced=replaced)


def convert_job(job: tuple[Converter, str]) -> Converted:
    """:func:`convert_file` on a ``(converter, path)`` pair, for ``Executor.map``."""
    return convert_file(job[0], Path(job[1]))
