"""Train a suite's tokenizer: byte-level BPE on the corpus's train split, saved in Hugging Face format.

The tokenizer is GPT-2/Pythia style: a ``tokenizers`` BPE model over the 256 byte symbols
(``ByteLevel`` pre-tokenizer, no prefix space, no normalisation), so every string encodes
and decodes losslessly. ``<|endoftext|>`` is id 0; it is both the EOS and BOS token and
separates documents in training rows. Nothing is added when encoding (no BOS, no EOS).

Only train-split documents are seen (the split is the corpus's: a pure function of the
document id, :mod:`lmscope.data.split`), so held-out text leaks into no merge. Training
reads the documents in file order and is deterministic: the same documents give the same
``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmscope.data.readers import read_documents
from lmscope.data.split import assign_split
from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_directory
from lmscope.progress import Progress, no_progress

EOS_TOKEN = "<|endoftext|>"
"""The one special token: end of a document (and BOS), id 0."""


def train_split_texts(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    heldout_fraction: float,
    stats: dict[str, int] | None = None,
) -> Iterator[str]:
    """The texts of the train-split documents of ``source``, in file order (``stats`` gets documents and bytes)."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    for document in read_documents([Path(path) for path in paths]):
        if assign_split(document.id, heldout_fraction) != "train":
            continue
        if stats is not None:
            stats["documents"] = stats.get("documents", 0) + 1
            stats["bytes"] = stats.get("bytes", 0) + len(document.text.encode("utf-8"))
        yield document.text


def build_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    """Train a byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` = 0 included) on ``texts``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as EOS and BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS_TOKEN],
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        model_max_length=1_000_000_000,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    heldout_fraction: float,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Train the suite tokenizer on the train split of ``source`` and save it to ``out_dir`` (atomically).

    Returns what ``suite.json`` records about it: vocabulary size, EOS id, the sha256 of
    ``tokenizer.json``, and the documents and bytes it was trained on. ``out_dir`` must not
    exist yet.
    """
    progress("train tokenizer", 0, 1)
    stats: dict[str, int] = {}
    tokenizer = build_tokenizer(train_split_texts(source, heldout_fraction, stats), vocab_size)
    if not stats.get("documents"):
        raise LmscopeError(f"documents {source!s} have no train-split document; give a corpus with more documents.")
    if len(tokenizer) < vocab_size:
        raise LmscopeError(
            f"the train split ({stats['bytes']:,} bytes) yields only {len(tokenizer)} tokens, fewer than vocab_size "
            f"{vocab_size}; lower vocab_size or give more text."
        )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
        digest = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
    progress("train tokenizer", 1, 1, vocab=len(tokenizer))
    return {
        "kind": "byte-level BPE (tokenizers), GPT-2/Pythia style, no prefix space",
        "vocab_size": len(tokenizer),
        "eos_token": EOS_TOKEN,
        "eos_token_id": int(eos_id),
        "tokenizer_json_sha256": digest,
        "trained_on": {"split": "train", "documents": stats["documents"], "bytes": stats["bytes"]},
    }
