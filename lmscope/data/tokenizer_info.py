"""The tokenizer as the corpus sees it: a batch encoder without special tokens, its vocabulary size and a hash.

The hash names the tokenizer by content (its ``tokenizer.json`` serialisation, or its
sorted vocabulary for a slow tokenizer), so a tokenized corpus records exactly which
tokenizer produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class CorpusTokenizer:
    """A tokenizer reduced to what tokenizing a corpus needs.

    Attributes:
        spec: how it was named (a model spec, a directory, or the object's ``name_or_path``).
        vocab_size: number of ids, added tokens included; every id is < ``vocab_size``.
        sha256: hex hash of its serialisation (fast) or sorted vocabulary (slow).
        kind: ``"fast"`` (Hugging Face ``tokenizers``) or ``"slow"``.
        encode_batch: texts → token ids per text, no special tokens added, no truncation.
    """

    spec: str
    vocab_size: int
    sha256: str
    kind: str
    encode_batch: Callable[[list[str]], list[list[int]]]

    def describe(self) -> dict[str, Any]:
        """The JSON-serialisable identity recorded in manifests."""
        return {"spec": self.spec, "vocab_size": self.vocab_size, "sha256": self.sha256, "kind": self.kind}


def load_any_tokenizer(spec: str) -> Any:
    """Load a tokenizer from a model spec, or from a directory holding only tokenizer files."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and any((path / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise LmscopeError(f"tokenizer directory {spec!r} could not be loaded ({str(err).splitlines()[0]}); check its files.") from None
    from lmscope.models.loading import load_tokenizer

    return load_tokenizer(spec)


def corpus_tokenizer(tokenizer: str | Any) -> CorpusTokenizer:
    """Wrap a tokenizer spec, a ``transformers`` tokenizer or a ``tokenizers.Tokenizer`` for corpus work."""
    from tokenizers import Tokenizer

    spec = tokenizer if isinstance(tokenizer, str) else str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    loaded = load_any_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if isinstance(loaded, Tokenizer):
        backend, vocab_size = loaded, loaded.get_vocab_size(with_added_tokens=True)
    elif getattr(loaded, "is_fast", False) and hasattr(loaded, "backend_tokenizer"):
        backend, vocab_size = loaded.backend_tokenizer, len(loaded)
    else:
        return _slow(loaded, spec)
    # A private copy, so that truncation or padding set on the caller's tokenizer cannot leak in.
    private = Tokenizer.from_str(backend.to_str())
    private.no_truncation()
    private.no_padding()
    serialised = private.to_str()
    encode = getattr(private, "encode_batch_fast", private.encode_batch)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    return CorpusTokenizer(
        spec=spec,
        vocab_size=int(vocab_size),
        sha256=hashlib.sha256(serialised.encode("utf-8")).hexdigest(),
        kind="fast",
        encode_batch=encode_batch,
    )


def _slow(tokenizer: Any, spec: str) -> CorpusTokenizer:
    if not callable(tokenizer) or not hasattr(tokenizer, "get_vocab"):
        raise LmscopeError(f"tokenizer {spec!r} is neither a transformers tokenizer nor a tokenizers.Tokenizer; pass a model spec or a tokenizer directory.")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return CorpusTokenizer(
        spec=spec,
        vocab_size=len(tokenizer),
        sha256=hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest(),
        kind="slow",
        encode_batch=encode_batch,
    )
