"""The tokenized corpus: round trip against the tokenizer's own encoding, dtype choice, validation on open, reruns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_fixtures import build_bpe_tokenizer, build_wide_tokenizer, corpus_records, write_jsonl

from lmscope.data.split import assign_split
from lmscope.data.tokenize_job import tokenize_corpus
from lmscope.data.tokenized import DOCUMENT_SCHEMA, TokenizedCorpus, token_dtype
from lmscope.errors import LmscopeError


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def hf_bpe(bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="module")
def records():
    extra = [{"id": "empty", "domain": "alpha", "text": ""}, {"id": "uni", "domain": "beta", "text": "Ünïcödé ✓ 🙂 \u00a0 end"}]
    return corpus_records(150) + extra


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bpe_dir, records):
    root = tmp_path_factory.mktemp("corpus")
    source = write_jsonl(root / "docs.jsonl.zst", records[:100] + ["{broken"] + records[100:])
    return tokenize_corpus(source, str(bpe_dir), root / "out", heldout_fraction=0.2, chunk_docs=32, batch_docs=7)


def test_every_document_equals_the_tokenizers_own_encoding(corpus, hf_bpe, records):
    assert len(corpus) == len(records)
    assert corpus.tokens.dtype == np.dtype("<u2")
    rows = corpus.documents.to_pylist()
    for index, record in enumerate(records):
        expected = hf_bpe.encode(record["text"], add_special_tokens=False)
        assert corpus.document_tokens(index).tolist() == expected, record["id"]
        row = rows[index]
        assert (row["doc_index"], row["id"], row["domain"]) == (index, record["id"], record["domain"])
        assert row["n_bytes"] == len(record["text"].encode("utf-8"))
        assert json.loads(row["provenance"]) == record.get("meta", {})
        assert row["split"] == assign_split(record["id"], 0.2)
    assert corpus.documents.schema.equals(DOCUMENT_SCHEMA)
    assert corpus.n_tokens == sum(len(hf_bpe.encode(r["text"], add_special_tokens=False)) for r in records)


def test_manifest_records_tokenizer_counts_and_reader_stats(corpus, bpe_dir, records):
    manifest = corpus.manifest
    assert manifest["tokenizer"]["spec"] == str(bpe_dir)
    assert manifest["tokenizer"]["vocab_size"] > 256 and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["dtype"] == "uint16" and manifest["n_documents"] == len(records)
    assert manifest["reader"]["skipped_malformed"] == 1 and manifest["reader"]["records"] == len(records) + 1
    assert any(":101: bad JSON" in issue for issue in manifest["reader"]["issues"])
    by_domain = manifest["counts"]["by_domain"]
    for domain in ("alpha", "beta", "gamma"):
        expected = [r for r in records if r["domain"] == domain]
        assert sum(by_domain[domain][split]["documents"] for split in ("train", "heldout")) == len(expected)
        assert sum(by_domain[domain][split]["bytes"] for split in ("train", "heldout")) == sum(len(r["text"].encode()) for r in expected)
    assert manifest["counts"]["by_split"]["heldout"]["documents"] == sum(assign_split(r["id"], 0.2) == "heldout" for r in records)
    assert manifest["files"]["tokens.bin"]["bytes"] == corpus.n_tokens * 2
    assert not (corpus.path / ".work").exists()


def test_iter_documents_filters_by_split_and_domain(corpus, records):
    everything = list(corpus.iter_documents())
    assert [index for index, *_ in everything] == list(range(len(records)))
    held_beta = list(corpus.iter_documents(split="heldout", domain="beta"))
    expected = [i for i, r in enumerate(records) if r["domain"] == "beta" and assign_split(r["id"], 0.2) == "heldout"]
    assert [index for index, *_ in held_beta] == expected and expected
    for index, doc_id, domain, tokens in held_beta:
        assert doc_id == records[index]["id"] and domain == "beta"
        assert np.array_equal(tokens, corpus.document_tokens(index))
    with pytest.raises(LmscopeError, match="domain 'nope' is not in"):
        list(corpus.iter_documents(domain="nope"))
    with pytest.raises(LmscopeError, match="out of range"):
        corpus.document_tokens(len(records))


def test_wide_vocabulary_uses_uint32(tmp_path):
    tokenizer_dir = build_wide_tokenizer(tmp_path / "wide", vocab_size=70_000)
    source = write_jsonl(tmp_path / "w.jsonl", [{"id": "a", "text": "w69998 w1 w65536"}, {"id": "b", "text": "w0 zzz"}])
    corpus = tokenize_corpus(source, str(tokenizer_dir), tmp_path / "out")
    assert corpus.manifest["dtype"] == "uint32" and corpus.tokens.dtype == np.dtype("<u4")
    assert corpus.document_tokens(0).tolist() == [69999, 2, 65537]
    assert corpus.document_tokens(1).tolist() == [1, 0]


def test_dtype_boundary():
    assert token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")


def test_rerun_returns_the_finished_corpus_and_refuses_other_inputs(tmp_path, bpe_dir):
    source = write_jsonl(tmp_path / "d.jsonl", corpus_records(10))
    first = tokenize_corpus(source, str(bpe_dir), tmp_path / "out")
    again = tokenize_corpus(source, str(bpe_dir), tmp_path / "out")
    assert again.manifest == first.manifest  # nothing was redone
    with pytest.raises(LmscopeError, match="already holds a tokenized corpus made from other inputs"):
        tokenize_corpus(source, str(bpe_dir), tmp_path / "out", heldout_fraction=0.5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(LmscopeError, match="holds other files \\(notes.txt\\)"):
        tokenize_corpus(source, str(bpe_dir), tmp_path / "busy")


def test_unfinished_job_with_other_settings_is_refused(tmp_path, bpe_dir):
    source = write_jsonl(tmp_path / "d.jsonl", corpus_records(10))
    work = tmp_path / "out" / ".work"
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps({"chunk_docs": 1}))
    with pytest.raises(LmscopeError, match="unfinished tokenization with different"):
        tokenize_corpus(source, str(bpe_dir), tmp_path / "out")


def _copy_corpus(corpus: TokenizedCorpus, target):
    target.mkdir()
    for name in ("tokens.bin", "documents.parquet", "manifest.json"):
        (target / name).write_bytes((corpus.path / name).read_bytes())
    return target


def test_truncated_tokens_bin_is_detected(tmp_path, corpus):
    broken = _copy_corpus(corpus, tmp_path / "broken")
    data = (broken / "tokens.bin").read_bytes()
    (broken / "tokens.bin").write_bytes(data[:-6])
    with pytest.raises(LmscopeError, match=r"tokens\.bin is truncated: \d+ bytes, but the manifest says \d+ uint16 tokens"):
        TokenizedCorpus.open(broken)


def test_missing_files_and_inconsistent_tables_are_detected(tmp_path, corpus):
    for name, pattern in [("manifest.json", "manifest.json is missing"), ("documents.parquet", "documents.parquet is missing")]:
        broken = _copy_corpus(corpus, tmp_path / f"no-{name}")
        (broken / name).unlink()
        with pytest.raises(LmscopeError, match=pattern):
            TokenizedCorpus.open(broken)
    broken = _copy_corpus(corpus, tmp_path / "offsets")
    table = pq.read_table(broken / "documents.parquet")
    lengths = table.column("n_tokens").to_pylist()
    lengths[0] += 1
    lengths[1] -= 1
    table = table.set_column(table.schema.get_field_index("n_tokens"), DOCUMENT_SCHEMA.field("n_tokens"), [lengths])
    pq.write_table(table, broken / "documents.parquet")
    with pytest.raises(LmscopeError, match="token offsets that do not tile"):
        TokenizedCorpus.open(broken)
    with pytest.raises(LmscopeError, match="does not exist"):
        TokenizedCorpus.open(tmp_path / "absent")


def test_empty_corpus(tmp_path, bpe_dir):
    source = write_jsonl(tmp_path / "d.jsonl", ["not json"])
    corpus = tokenize_corpus(source, str(bpe_dir), tmp_path / "out")
    assert len(corpus) == 0 and corpus.n_tokens == 0 and list(corpus.iter_documents()) == []
    assert corpus.manifest["reader"]["skipped_malformed"] == 1


def test_strict_tokenization_fails_on_malformed_record(tmp_path, bpe_dir):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"id": "x"}])
    with pytest.raises(LmscopeError, match=r"d\.jsonl:2: the field 'text' is missing"):
        tokenize_corpus(source, str(bpe_dir), tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_accepts_a_loaded_tokenizer_and_several_sources(tmp_path, hf_bpe, bpe_dir):
    first = write_jsonl(tmp_path / "a.jsonl", corpus_records(5))
    second = tmp_path / "texts"
    (second / "notes").mkdir(parents=True)
    (second / "notes" / "n.txt").write_text("a note about git")
    corpus = tokenize_corpus([first, second], hf_bpe, tmp_path / "out")
    assert len(corpus) == 6
    assert corpus.documents.column("id").to_pylist()[-1] == "notes/n.txt"
    assert corpus.document_tokens(5).tolist() == hf_bpe.encode("a note about git", add_special_tokens=False)
    by_spec = tokenize_corpus([first, second], str(bpe_dir), tmp_path / "out2")
    assert by_spec.manifest["tokenizer"]["sha256"] == corpus.manifest["tokenizer"]["sha256"]
    assert (by_spec.path / "tokens.bin").read_bytes() == (corpus.path / "tokens.bin").read_bytes()


def test_concurrent_jobs_on_one_directory_agree(tmp_path, bpe_dir):
    import threading

    source = write_jsonl(tmp_path / "d.jsonl", corpus_records(200))
    results, errors = [], []

    def run():
        try:
            results.append(tokenize_corpus(source, str(bpe_dir), tmp_path / "out", chunk_docs=16, batch_docs=8))
        except Exception as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 3
    assert len({json.dumps({k: v for k, v in r.manifest.items() if k != "run"}) for r in results}) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["documents.parquet", "manifest.json", "tokens.bin"]
