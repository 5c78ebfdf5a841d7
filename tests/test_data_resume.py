"""Tokenization survives SIGKILL: a killed-then-resumed job gives the same bytes as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from data_fixtures import build_bpe_tokenizer, corpus_records, write_jsonl

from lmscope.data.tokenize_job import tokenize_corpus

CHUNK_DOCS = 20
# Each progress report sleeps, so that the job takes a few seconds and can be killed mid-way.
SLOW_JOB = textwrap.dedent(
    """
    import sys, time
    from lmscope.data.tokenize_job import tokenize_corpus

    def slow(task, advance=0, total=None, **fields):
        time.sleep(0.03)

    tokenize_corpus(sys.argv[1], sys.argv[2], sys.argv[3], heldout_fraction=0.1, chunk_docs=int(sys.argv[4]), batch_docs=5, progress=slow)
    """
)


def _without_run(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "run"}


def test_kill_and_resume_is_byte_identical(tmp_path):
    tokenizer = str(build_bpe_tokenizer(tmp_path / "tok"))
    source = write_jsonl(tmp_path / "docs.jsonl.zst", corpus_records(400) + ["{malformed"])
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    job = subprocess.Popen(
        [sys.executable, "-c", SLOW_JOB, str(source), tokenizer, str(killed), str(CHUNK_DOCS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    deadline = time.monotonic() + 90
    try:
        while len(list((killed / ".work").glob("chunk-*.parquet"))) < 3:
            assert job.poll() is None, job.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the job never wrote three chunks"
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait()
    assert job.returncode == -signal.SIGKILL
    done_before_resume = len(list((killed / ".work").glob("chunk-*.parquet")))
    assert not (killed / "manifest.json").exists()
    assert 3 <= done_before_resume < 400 // CHUNK_DOCS + 1

    resumed = tokenize_corpus(source, tokenizer, killed, heldout_fraction=0.1, chunk_docs=CHUNK_DOCS, batch_docs=64)
    uninterrupted = tokenize_corpus(source, tokenizer, reference, heldout_fraction=0.1, chunk_docs=CHUNK_DOCS, batch_docs=5)

    assert resumed.manifest["run"]["chunks_resumed"] == done_before_resume
    assert uninterrupted.manifest["run"]["chunks_resumed"] == 0
    for name in ("tokens.bin", "documents.parquet"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    assert _without_run(json.loads((killed / "manifest.json").read_text())) == _without_run(json.loads((reference / "manifest.json").read_text()))
    assert resumed.manifest["reader"]["skipped_malformed"] == 1  # counted once, although the documents were read twice
    assert sorted(path.name for path in killed.iterdir()) == ["documents.parquet", "manifest.json", "tokens.bin"]
