"""``lmscope corpus``: tokenize, stats and build-default through the CLI; bad input gives one sentence and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_fixtures import build_bpe_tokenizer, corpus_records, write_jsonl
from typer.testing import CliRunner

import lmscope.cli
from lmscope.data.default_corpus import DEBIAN_SOURCES, check_sources
from lmscope.errors import LmscopeError

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    lmscope.cli._register()
    return lmscope.cli.app


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(build_bpe_tokenizer(tmp_path_factory.mktemp("tok")))


def _lmscope(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the real entry point, as a user would."""
    return subprocess.run([sys.executable, "-m", "lmscope.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_tokenize_then_stats_json(app, tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl.gz", corpus_records(30) + ["{oops"])
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["corpus", "tokenize", str(source), "--tokenizer", tokenizer, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "tokenized" and report["documents"] == 30 and report["dtype"] == "uint16"
    assert report["reader"]["skipped_malformed"] == 1 and ":31: bad JSON" in report["reader"]["issues"][0]

    result = runner.invoke(app, ["corpus", "stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["tokens"] == report["tokens"] and stats["documents"] == 30
    assert {row["domain"] for row in stats["rows"]} == {"alpha", "beta", "gamma"}
    assert sum(row["documents"] for row in stats["rows"]) == 30
    assert stats["by_split"]["train"]["documents"] + stats["by_split"]["heldout"]["documents"] == 30

    result = runner.invoke(app, ["corpus", "stats", str(out)])
    assert result.exit_code == 0 and "per domain and split" in result.stdout and "alpha" in result.stdout


def test_stats_of_raw_documents(app, tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl.zst", corpus_records(9) + [b'{"text": "\xff"}'])
    result = runner.invoke(app, ["corpus", "stats", str(source), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["kind"] == "documents" and stats["documents"] == 10
    assert stats["reader"]["utf8_replaced"] == 1
    assert {row["domain"]: row["documents"] for row in stats["rows"]} == {"alpha": 3, "beta": 3, "gamma": 3, "raw": 1}


def test_bad_input_is_one_sentence_and_exit_2(tmp_path, tokenizer):
    missing = _lmscope("corpus", "stats", str(tmp_path / "absent.jsonl"))
    assert missing.returncode == 2
    assert "absent.jsonl' does not exist; check the path." in missing.stderr and "Traceback" not in missing.stderr

    source = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{not json"])
    strict = _lmscope("corpus", "tokenize", str(source), "--tokenizer", tokenizer, "--out", str(tmp_path / "o"), "--strict")
    assert strict.returncode == 2
    assert f"{source}:2: bad JSON" in strict.stderr and "Traceback" not in strict.stderr

    (tmp_path / "cut.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03")
    truncated = _lmscope("corpus", "stats", str(tmp_path / "cut.jsonl.gz"))
    assert truncated.returncode == 2 and "cut.jsonl.gz is a truncated gzip file" in truncated.stderr

    unfinished = tmp_path / "unfinished"
    (unfinished / ".work").mkdir(parents=True)
    opened = _lmscope("corpus", "stats", str(unfinished))
    assert opened.returncode == 2 and "not a finished tokenized corpus" in opened.stderr


def test_skipped_records_are_warned_about(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, "{not json"])
    result = _lmscope("corpus", "tokenize", str(source), "--tokenizer", tokenizer, "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 malformed records" in result.stderr and f"{source}:2: bad JSON" in result.stderr


def _real_packages_present() -> bool:
    try:
        check_sources(DEBIAN_SOURCES)
    except LmscopeError:
        return False
    return True


@pytest.mark.skipif(not _real_packages_present(), reason="the Debian documentation packages are not installed")
def test_build_default_command(app, tmp_path):
    result = runner.invoke(app, ["corpus", "build-default", "--out", str(tmp_path / "d"), "--limit-per-domain", "2", "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert [source["domain"] for source in manifest["sources"]] == ["python-docs", "git-docs", "postgres-docs", "manpages"]
    assert manifest["total"]["documents"] >= 4 and (tmp_path / "d" / "documents.jsonl.zst").is_file()
    result = runner.invoke(app, ["corpus", "stats", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["documents"] == manifest["total"]["documents"]
