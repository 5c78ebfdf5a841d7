"""Replay of a mini suite (rows, segments, corpus), both directions, checked against the packing that wrote it; and its CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmscope.cli import main
from lmscope.errors import LmscopeError
from lmscope.suites.replay import MiniSuiteSource, find_document, find_tokens, open_source, replay_step
from replay_fixtures import MiniSuite, build_mini_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> MiniSuite:
    base = tmp_path_factory.mktemp("mini")
    return build_mini_suite(base / "suite", base / "work")


@pytest.fixture(scope="module")
def source(suite: MiniSuite) -> MiniSuiteSource:
    opened = open_source(suite.root)
    assert isinstance(opened, MiniSuiteSource)
    return opened


def test_every_step_replays_the_rows_written(suite: MiniSuite, source: MiniSuiteSource) -> None:
    assert source.num_steps == suite.n_steps and source.row_length == suite.seq_len + 1  # two extra rows are no step
    for step in range(suite.n_steps):
        batch = replay_step(source, step)
        np.testing.assert_array_equal(batch.tokens, np.asarray(suite.step_rows(step)))
        assert batch.rows.tolist() == list(range(suite.batch_size * step, suite.batch_size * (step + 1)))
    assert len(source.seen_before(suite.n_steps)) == suite.batch_size * suite.n_steps
    with pytest.raises(LmscopeError, match=rf"step {suite.n_steps} is beyond .* holds {suite.n_steps} steps"):
        source.step(suite.n_steps)


def test_segments_are_the_pieces_written_and_map_back_to_the_corpus(suite: MiniSuite, source: MiniSuiteSource) -> None:
    seen = []
    for step in range(suite.n_steps):
        batch = source.step(step)
        for i, pieces in enumerate(batch.segments):
            row = int(batch.rows[i])
            for piece in pieces:
                seen.append((piece.row, piece.row_offset, piece.length, piece.doc_index, piece.doc_offset))
                assert piece.row == row and piece.doc_id == suite.doc_ids[piece.doc_index] and piece.domain == suite.domains[piece.doc_index]
                in_row = batch.tokens[i, piece.row_offset : piece.row_offset + piece.length].tolist()
                in_doc = source.corpus.document_tokens(piece.doc_index)[piece.doc_offset : piece.doc_offset + piece.length].tolist()
                assert in_row == in_doc == suite.doc_tokens[piece.doc_index][piece.doc_offset : piece.doc_offset + piece.length]
                assert piece.ends_document == (piece.doc_offset + piece.length == len(suite.doc_tokens[piece.doc_index]))
    trained = sorted(p for p in suite.pieces if p[0] < suite.n_steps * suite.batch_size)
    assert sorted(seen) == trained


def test_find_document_returns_the_steps_where_the_planted_document_was_placed(suite: MiniSuite, source: MiniSuiteSource) -> None:
    result = find_document(source, "planted-zq")
    expected = suite.expected_steps(suite.planted)
    assert [(e.step, e.row, e.row_offset, e.doc_offset, e.length) for e in result.exposures] == expected
    assert len({step for step, *_ in expected}) == 2  # placed twice, at two steps
    assert result.steps == sorted({step for step, *_ in expected}) and result.first_step == expected[0][0]
    assert result.tokens_covered == len(suite.doc_tokens[suite.planted]) and result.domain == "planted"
    assert find_document(source, doc_index=suite.planted).exposures == result.exposures
    never = find_document(source, "unused")
    assert never.exposures == [] and never.first_step is None and never.tokens_covered == 0


def test_find_a_token_range_inside_a_document(suite: MiniSuite, source: MiniSuiteSource) -> None:
    n = len(suite.doc_tokens[suite.planted])
    for start, stop in [(0, 3), (20, 25), (n - 4, n), (10, n)]:
        result = find_document(source, doc_index=suite.planted, token_range=(start, stop))
        assert [(e.step, e.row, e.row_offset, e.doc_offset, e.length) for e in result.exposures] == suite.expected_steps(suite.planted, start, stop)
        for e in result.exposures:  # each exposure's row tokens are exactly those document tokens
            row = suite.rows[e.row][e.row_offset : e.row_offset + e.length]
            assert row == suite.doc_tokens[suite.planted][e.doc_offset : e.doc_offset + e.length]
            assert start <= e.doc_offset and e.doc_offset + e.length <= stop
        assert result.tokens_covered == stop - start
    with pytest.raises(LmscopeError, match=rf"token range 5:{n + 1} is not inside document 'planted-zq' of {n} tokens"):
        find_document(source, "planted-zq", token_range=(5, n + 1))


def test_reverse_of_forward_is_consistent(suite: MiniSuite, source: MiniSuiteSource) -> None:
    """Every piece of every step is found again by its document, and nothing else is."""
    forward = set()
    for step in range(suite.n_steps):
        for pieces in source.step(step).segments:
            forward |= {(step, p.row, p.row_offset, p.doc_index, p.doc_offset, p.length) for p in pieces}
    backward = set()
    for doc in range(source.num_documents):
        for e in find_document(source, doc_index=doc).exposures:
            backward.add((e.step, e.row, e.row_offset, doc, e.doc_offset, e.length))
    assert forward == backward
    untrained = find_document(source, doc_index=suite.pieces[-1][3]).untrained_rows
    assert untrained >= 1  # the last piece lies in a row past the last step


def test_find_tokens_names_the_documents_it_lands_in(suite: MiniSuite, source: MiniSuiteSource) -> None:
    needle = suite.doc_tokens[suite.planted][12:18]
    result = find_tokens(source, needle)
    truth = [
        (r // suite.batch_size, r, o)
        for r in range(suite.n_steps * suite.batch_size)
        for o in range(suite.seq_len + 1 - len(needle) + 1)
        if suite.rows[r][o : o + len(needle)] == needle
    ]
    assert [(m.step, m.row, m.row_offset) for m in result.matches] == truth and truth
    for match in result.matches:
        assert match.segment is not None and match.segment.doc_id == "planted-zq"
        assert match.to_dict()["doc_offset"] == 12


def test_unknown_document_suggests_the_nearest_ids(source: MiniSuiteSource) -> None:
    with pytest.raises(LmscopeError, match=r"document id 'doc_12' is not in .*nearest ids are 'doc-12'"):
        find_document(source, "doc_12")
    with pytest.raises(LmscopeError, match="document index 999 is out of range"):
        find_document(source, doc_index=999)
    with pytest.raises(LmscopeError, match="exactly one"):
        find_document(source, "doc-1", doc_index=1)


def test_broken_mini_suites_are_refused_with_one_sentence(suite: MiniSuite, tmp_path: Path) -> None:
    def copy() -> Path:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(suite.root, target)
        return target

    broken = copy()
    (broken / "data" / "segments.parquet").unlink()
    with pytest.raises(LmscopeError, match="segments.parquet is missing"):
        MiniSuiteSource(broken)
    broken = copy()
    meta = json.loads((broken / "suite.json").read_text())
    (broken / "suite.json").write_text(json.dumps(meta | {"seq_len": 63}))
    with pytest.raises(LmscopeError, match="row 0 holds 32 tokens, but suite.json's seq_len 63"):
        MiniSuiteSource(broken)
    broken = copy()
    table = pq.read_table(broken / "data" / "segments.parquet")
    lengths = table.column("length").to_pylist()
    lengths[3] = 1000
    pq.write_table(table.set_column(2, "length", pa.array(lengths, pa.int32())), broken / "data" / "segments.parquet")
    with pytest.raises(LmscopeError, match="record 3 .*length 1000.* do not belong together"):
        MiniSuiteSource(broken)
    broken = copy()
    (broken / "data" / "train.bin").write_bytes((broken / "data" / "train.bin").read_bytes()[:-10])
    with pytest.raises(LmscopeError, match="train.bin.*truncated"):
        MiniSuiteSource(broken)
    broken = copy()
    (broken / "suite.json").write_text(json.dumps(meta | {"batch_size": 0}))
    with pytest.raises(LmscopeError, match="batch_size must be a positive integer"):
        open_source(broken)
    with pytest.raises(LmscopeError, match="is a mini suite, which describes its own data; drop --batch-size"):
        open_source(suite.root, batch_size=8)


def test_size_directories_order_json_and_own_tokenizer(suite: MiniSuite, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "suite"
    shutil.copytree(suite.root, root)
    meta = json.loads((root / "suite.json").read_text())
    (root / "suite.json").write_text(json.dumps({"format": meta["format"], "name": "tiny"}))  # sizes only in data/order.json
    (root / "data" / "order.json").write_text(json.dumps({"format": "lmscope-data-order", "batch_size": suite.batch_size, "seq_len": suite.seq_len}))
    (root / "70k").mkdir()
    (root / "70k" / "suite.json").write_text(json.dumps({"size": "70k"}))
    source = open_source(root / "70k")  # a size directory names its suite: all sizes share the rows
    assert isinstance(source, MiniSuiteSource) and source.root == root and source.batch_size == suite.batch_size
    np.testing.assert_array_equal(source.step(3).tokens, np.asarray(suite.step_rows(3)))
    shutil.copytree(suite.tokenizer, root / "tokenizer")
    code, out, err = _run(["replay", str(root), "--step", "4"], capsys)
    assert code == 0, err
    assert "text" in out and "Zebra" in out  # decoded with the suite's own tokenizer, no --tokenizer needed


# --- the CLI on a mini suite -------------------------------------------------------------


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_cli_step_json_and_table(suite: MiniSuite, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["replay", str(suite.root), "--step", "2", "--json", "--tokens"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["step"] == 2 and data["rows_in_step"] == suite.batch_size and data["seen_before_rows"] == 2 * suite.batch_size
    assert [row["row"] for row in data["rows"]] == list(range(8, 12))
    assert [row["tokens"] for row in data["rows"]] == suite.step_rows(2)
    pieces = sorted((row["row"], s["row_offset"], s["length"], s["doc_index"], s["doc_offset"]) for row in data["rows"] for s in row["segments"])
    assert pieces == sorted(p for p in suite.pieces if 8 <= p[0] < 12)
    assert {d["doc_id"] for d in data["documents"]} == {suite.doc_ids[p[3]] for p in pieces}
    code, out, _ = _run(["replay", "step", str(suite.root), "--step", "2", "--rows", "1:3", "--json"], capsys)
    assert code == 0 and [row["row"] for row in json.loads(out)["rows"]] == [9, 10] and "tokens" not in json.loads(out)["rows"][0]
    code, out, _ = _run(["replay", str(suite.root), "--step", "4", "--tokenizer", str(suite.tokenizer)], capsys)
    out = " ".join(out.split())
    assert code == 0 and "step 4" in out and "planted-zq" in out and "the batch that trains step4 into step5" in out


def test_cli_find_document_range_and_text(suite: MiniSuite, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["replay", "find", "planted-zq", "--suite", str(suite.root), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    expected = suite.expected_steps(suite.planted)
    assert data["steps"] == sorted({e[0] for e in expected}) and data["first_step"] == expected[0][0]
    assert [(e["step"], e["row"], e["row_offset"], e["doc_offset"], e["length"]) for e in data["exposures"]] == expected
    code, out, _ = _run(["replay", "find", "--doc-index", str(suite.planted), "--tokens", "20:25", "--suite", str(suite.root), "--json"], capsys)
    assert code == 0 and [(e["step"], e["doc_offset"], e["length"]) for e in json.loads(out)["exposures"]] == [(e[0], e[3], e[4]) for e in suite.expected_steps(suite.planted, 20, 25)]
    code, out, _ = _run(["replay", "find", "planted-zq", "--suite", str(suite.root)], capsys)
    assert code == 0 and "first at step" in out and "exposures" in out
    # --text with the corpus's own tokenizer finds the planted document's text (mid-text words carry their space)
    code, out, err = _run(["replay", "find", "--text", " quokka xylophone", "--suite", str(suite.root), "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    assert found["matches"] and {m["doc_id"] for m in found["matches"]} == {"planted-zq"}
    ids, width = found["token_ids"], len(found["token_ids"])
    trained_rows = range(suite.n_steps * suite.batch_size)
    truth = [(r // suite.batch_size, r, o) for r in trained_rows for o in range(suite.seq_len + 2 - width) if suite.rows[r][o : o + width] == ids]
    assert [(m["step"], m["row"], m["row_offset"]) for m in found["matches"]] == truth
    assert {step for step, *_ in truth} < {e[0] for e in expected}  # the late copy straddles two rows: never seen whole


def test_cli_bad_input_is_one_sentence_and_exit_2(suite: MiniSuite, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in [
        (["replay", str(suite.root), "--step", "99"], "holds 6 steps (0 … 5)"),
        (["replay", "find", "no-such-doc", "--suite", str(suite.root)], "is not in"),
        (["replay", "find", "--suite", str(suite.root)], "exactly one of"),
        (["replay", "find", "planted-zq", "--suite", str(suite.root), "--tokens", "9:3"], "--tokens '9:3' is not a range"),
        (["replay", str(suite.root), "--step", "1", "--rows", "a:b"], "--rows 'a:b' is not a range"),
        (["replay", "find", "planted-zq"], "--suite"),
    ]:
        code, out, err = _run(args, capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)
