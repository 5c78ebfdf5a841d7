"""Small tokenizers and document files for the data tests, built in seconds without the default model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import zstandard

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Python lists are mutable sequences, typically used to store collections of homogeneous items.",
    "git rebase reapplies commits on top of another base tip.",
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active';",
    "Héllo wörld — naïve café, 東京, emoji 🙂 and tabs\tand\nnewlines.",
    "",
    "man(1): an interface to the system reference manuals.",
]


def training_text(repeat: int = 20) -> list[str]:
    return SAMPLE_TEXTS * repeat


def build_bpe_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """Train a tiny GPT-2-style byte-level BPE and save it as a ``PreTrainedTokenizerFast`` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(training_text(), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    wrapped.save_pretrained(str(directory))
    return directory


def build_wide_tokenizer(directory: Path, vocab_size: int = 70_000) -> Path:
    """A word-level tokenizer with more than 65,536 ids (words ``w0`` … ``w{vocab_size-2}`` plus ``[UNK]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab_size - 1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    wrapped.save_pretrained(str(directory))
    return directory


def write_jsonl(path: Path, records: list[dict | str | bytes]) -> Path:
    """Write records (dicts as JSON; str/bytes lines verbatim) as JSONL, compressed by suffix (.gz, .zst)."""
    lines = []
    for record in records:
        if isinstance(record, dict):
            lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        elif isinstance(record, str):
            lines.append(record.encode("utf-8"))
        else:
            lines.append(record)
    data = b"\n".join(lines) + b"\n"
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def corpus_records(n: int, domains: tuple[str, ...] = ("alpha", "beta", "gamma")) -> list[dict]:
    """``n`` varied documents across ``domains`` with ids ``doc-<i>``."""
    records = []
    for i in range(n):
        base = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
        records.append(
            {"id": f"doc-{i}", "domain": domains[i % len(domains)], "text": f"{base} Number {i}. " * (1 + i % 4), "meta": {"i": i}}
        )
    return records


def tiny_tokenized_corpus(root: Path, *, vocab_size: int = 400, n_documents: int = 40, heldout_fraction: float = 0.5):
    """A real tokenized corpus under ``root``: a BPE tokenizer trained here (``root/tok``) over ``corpus_records``."""
    from lmscope.data.tokenize_job import tokenize_corpus
    from lmscope.data.tokenized import TokenizedCorpus

    build_bpe_tokenizer(root / "tok", vocab_size=vocab_size)
    documents = write_jsonl(root / "docs.jsonl", corpus_records(n_documents))
    return TokenizedCorpus.open(tokenize_corpus(documents, str(root / "tok"), root / "corpus", heldout_fraction=heldout_fraction).path)
