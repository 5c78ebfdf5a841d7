"""Document readers: JSONL (plain, gz, zst), Parquet, text directories; malformed records, invalid UTF-8, corrupt files."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from data_fixtures import write_jsonl

from lmscope.data.documents import MAX_ISSUES, ReadStats
from lmscope.data.readers import read_documents, read_jsonl, source_format
from lmscope.errors import LmscopeError

# Line 1 good, 2 bad JSON, 3 good with invalid UTF-8, 4 missing text, 5 blank, 6 text not a string,
# 7 not an object, 8 good without id/domain, 9 bad meta, 10 unpaired surrogate escape.
MIXED_LINES = [
    {"id": "a", "domain": "web", "text": "first document", "meta": {"url": "http://a"}},
    '{"id": "b", "text": "unterminated',
    b'{"id": "c", "domain": "web", "text": "caf\xe9 bytes"}',
    {"id": "d", "domain": "web"},
    "",
    {"id": "e", "text": 42},
    "[1, 2, 3]",
    {"text": "no id nor domain", "source": "crawl"},
    {"id": "f", "text": "x", "meta": [1]},
    '{"id": "g", "text": "lone \\ud800 surrogate"}',
]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst"])
def test_jsonl_counts_skips_and_replaces(tmp_path, name):
    path = write_jsonl(tmp_path / name, MIXED_LINES)
    reader = read_documents(path)
    documents = list(reader)
    stats = reader.stats

    assert [d.id for d in documents] == ["a", "c", f"{name}:8", "g"]
    assert documents[0].meta == {"url": "http://a"}
    assert documents[1].text == "caf\ufffd bytes"
    assert documents[2].domain == "docs"  # the file name without extensions
    assert documents[2].meta == {"source": "crawl"}  # unknown fields are kept as provenance
    assert documents[3].text == "lone \ufffd surrogate"
    assert (stats.files, stats.records, stats.documents) == (1, 9, 4)
    assert stats.skipped_malformed == 5
    assert stats.utf8_replaced == 2
    assert stats.blank_lines == 1
    assert stats.text_bytes == sum(len(d.text.encode()) for d in documents)
    issues = "\n".join(stats.issues)
    for line, what in [(2, "bad JSON"), (3, "invalid UTF-8"), (4, "the field 'text' is missing"), (6, "the field 'text' is a number"),
                       (7, "the record is an array, not an object"), (9, "the field 'meta' is an array")]:
        assert f"{path}:{line}: {what}" in issues


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.zst"])
def test_strict_mode_fails_with_file_and_line(tmp_path, name):
    path = write_jsonl(tmp_path / name, MIXED_LINES)
    with pytest.raises(LmscopeError, match=rf"{path.name}:2: bad JSON") as info:
        list(read_documents(path, strict=True))
    assert str(path) in str(info.value) and "--strict" in str(info.value)


def test_strict_mode_still_replaces_invalid_utf8(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [b'{"id": "c", "text": "caf\xe9"}'])
    reader = read_documents(path, strict=True)
    assert [d.text for d in reader] == ["caf\ufffd"]
    assert reader.stats.utf8_replaced == 1


def test_custom_fields_and_default_domain(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"doc": 7, "body": "hello"}])
    [document] = read_documents(path, text_field="body", id_field="doc", domain="books")
    assert (document.id, document.domain, document.text, document.meta) == ("7", "books", "hello", {})


def test_issue_list_is_capped_but_everything_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["not json"] * (MAX_ISSUES + 7))
    reader = read_documents(path)
    assert list(reader) == []
    assert reader.stats.skipped_malformed == MAX_ISSUES + 7
    assert len(reader.stats.issues) == MAX_ISSUES and reader.stats.issues_not_shown == 7


def _many_lines(n: int = 5000) -> bytes:
    return b"".join(json.dumps({"id": str(i), "text": f"document number {i} " * 5}).encode() + b"\n" for i in range(n))


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    data = gzip.compress(_many_lines(), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmscopeError, match=r"cut\.jsonl\.gz is a truncated gzip file"):
        list(read_documents(path))


def test_truncated_zstd_is_an_error_naming_the_file(tmp_path):
    data = zstandard.ZstdCompressor().compress(_many_lines())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[:-7])
    with pytest.raises(LmscopeError, match=r"cut\.jsonl\.zst is corrupt: it ends in the middle of a zstd frame"):
        list(read_documents(path))


def test_multi_frame_zstd_reads_every_frame(tmp_path):
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(compressor.compress(b'{"text": "one"}\n') + compressor.compress(b'{"text": "two"}\n'))
    assert [d.text for d in read_documents(path)] == ["one", "two"]


def test_garbage_with_compressed_suffix_is_an_error(tmp_path):
    for name, kind in [("junk.jsonl.gz", "gzip"), ("junk.jsonl.zst", "zstd")]:
        path = tmp_path / name
        path.write_bytes(b"this is not compressed at all\n")
        with pytest.raises(LmscopeError, match=rf"{name} is not a valid {kind} file"):
            list(read_documents(path))


def test_parquet_reader(tmp_path):
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "text": pa.array([b"plain", b"bad \xff byte", None, "ünïcode".encode()], pa.binary()),
            "domain": ["news", "news", "news", None],
            "url": ["u1", "u2", "u3", "u4"],
        }
    )
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, row_group_size=2)
    reader = read_documents(path)
    documents = list(reader)
    assert [(d.id, d.domain, d.text) for d in documents] == [("1", "news", "plain"), ("2", "news", "bad \ufffd byte"), ("4", "docs", "ünïcode")]
    assert documents[0].meta == {"url": "u1"}
    assert (reader.stats.records, reader.stats.skipped_malformed, reader.stats.utf8_replaced) == (4, 1, 1)
    assert f"{path}:row 3: the field 'text' is missing" in reader.stats.issues


def test_parquet_string_column_and_missing_column(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "meta": ['{"k": 1}', None]}), path)
    assert [(d.text, d.meta) for d in read_documents(path)] == [("a", {"k": 1}), ("b", {})]
    with pytest.raises(LmscopeError, match=r"has no column 'body' \(columns: text, meta\)"):
        list(read_documents(path, text_field="body"))


def test_truncated_parquet_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1000)]}), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LmscopeError, match=r"cut\.parquet is not a readable Parquet file"):
        list(read_documents(path))


def test_text_directory_reader(tmp_path):
    root = tmp_path / "notes"
    (root / "a" / "sub").mkdir(parents=True)
    (root / "b").mkdir()
    (root / ".git").mkdir()
    (root / "a" / "x.txt").write_text("alpha x")
    (root / "a" / "sub" / "y.md").write_text("alpha y")
    (root / "top.txt").write_text("top level")
    (root / "b" / "latin1.txt").write_bytes(b"caf\xe9")
    (root / "b" / "binary.dat").write_bytes(b"\x00\x01\x02")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "HEAD").write_text("ref")

    reader = read_documents(root)
    documents = list(reader)
    assert [(d.id, d.domain) for d in documents] == [("a/sub/y.md", "a"), ("a/x.txt", "a"), ("b/latin1.txt", "b"), ("top.txt", "notes")]
    assert documents[2].text == "caf\ufffd"
    assert (reader.stats.files, reader.stats.documents, reader.stats.skipped_malformed, reader.stats.utf8_replaced) == (5, 4, 1, 1)
    assert any("b/binary.dat:1: it is a binary file" in issue for issue in reader.stats.issues)
    assert {d.domain for d in read_documents(root, domain="mine")} == {"mine"}
    with pytest.raises(LmscopeError, match=r"binary\.dat:1: it is a binary file"):
        list(read_documents(root, strict=True))


def test_several_sources_share_one_stats(tmp_path):
    first = write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}, "bad"])
    second = write_jsonl(tmp_path / "two.jsonl.gz", [{"text": "b"}])
    reader = read_documents([first, second])
    assert [d.id for d in reader] == ["one.jsonl:1", "two.jsonl.gz:1"]
    assert (reader.stats.files, reader.stats.documents, reader.stats.skipped_malformed) == (2, 2, 1)


def test_unknown_and_missing_sources(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LmscopeError, match=r"x\.csv' has an unknown format; give \.jsonl"):
        source_format(tmp_path / "x.csv")
    with pytest.raises(LmscopeError, match=r"nope\.txt' does not exist"):
        read_documents(tmp_path / "nope.txt")


def test_readers_are_lazy(tmp_path):
    """A generator: the first document comes out before the corrupt end of the file is reached."""
    data = zstandard.ZstdCompressor().compress(_many_lines(20000))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) - 10])
    stats = ReadStats()
    first = next(read_jsonl(path, stats))
    assert first.id == "0" and stats.documents == 1
