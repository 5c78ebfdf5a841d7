"""Replay of Pythia, OLMo and Amber data written in their real on-disk formats, checked against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmscope.errors import LmscopeError
from lmscope.suites.replay import (
    AmberSource,
    OlmoSource,
    PythiaSource,
    find_document,
    find_tokens,
    open_source,
    replay_step,
)
from lmscope.suites.replay.base import eos_segments
from replay_fixtures import EOS, PLANTED, build_amber, build_olmo, build_pythia, shard_pythia

# --- Pythia ------------------------------------------------------------------------------


def _assert_pythia_batch(source: PythiaSource, rows: list[np.ndarray], batch_size: int, step: int) -> None:
    batch = source.step(step)
    want = np.stack(rows[batch_size * step : batch_size * (step + 1)])
    np.testing.assert_array_equal(batch.tokens, want)
    assert batch.rows.tolist() == list(range(batch_size * step, batch_size * (step + 1)))
    assert batch.positions.tolist() == batch.rows.tolist()


def test_pythia_step_is_rows_B_N_to_B_N_plus_B(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=43, seq_len=15)
    source = PythiaSource(data.prefix, batch_size=4, seq_len=15)
    assert source.num_steps == 10 and source.row_length == 16  # 43 rows: 10 full batches, 3 rows left over
    for step in range(10):
        _assert_pythia_batch(source, data.rows, 4, step)
    assert list(source.seen_before(3)) == list(range(12))
    part = source.step(7, slice(1, 3))
    np.testing.assert_array_equal(part.tokens, np.stack(data.rows[29:31]))
    assert part.start == 1 and part.rows_in_step == 4
    with pytest.raises(LmscopeError, match=r"step 10 is beyond .* 10 steps \(0 … 9\)"):
        source.step(10)
    with pytest.raises(LmscopeError, match="step -1"):
        source.step(-1)


def test_pythia_segments_are_eos_delimited_pieces(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=8, seq_len=31)
    batch = PythiaSource(data.prefix, batch_size=4, seq_len=31).step(1)
    for i, pieces in enumerate(batch.segments):
        row = data.rows[4 + i].tolist()
        # brute force: a piece ends at each EOS (inclusive) and at the row's end
        cuts = [p + 1 for p, token in enumerate(row) if token == EOS]
        bounds = [0] + [c for c in cuts if c < len(row)] + [len(row)]
        assert [(s.row_offset, s.row_offset + s.length) for s in pieces] == list(zip(bounds[:-1], bounds[1:]))
        assert all(s.row == 4 + i and s.doc_index is None and s.doc_id is None for s in pieces)
        assert [s.ends_document for s in pieces] == [row[s.row_offset + s.length - 1] == EOS for s in pieces]
        assert [s.doc_offset for s in pieces] == [None if s.row_offset == 0 else 0 for s in pieces]
    assert [(s.row_offset, s.length) for s in eos_segments(3, np.array([5, 0, 0, 7]), EOS)] == [(0, 2), (2, 1), (3, 1)]
    assert [(s.row_offset, s.length) for s in eos_segments(3, np.array([5, 0, 0, 7]), None)] == [(0, 4)]


def test_pythia_byte_shards_and_concatenated_prefixes_read_the_same_rows(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "whole", n_rows=24, seq_len=15)
    sharded = build_pythia(tmp_path / "sharded", n_rows=24, seq_len=15)
    shards = shard_pythia(sharded.prefix, shard_bytes=50)  # 50 bytes: rows of 32 bytes straddle shard ends
    assert len(shards) == 16 and not (tmp_path / "sharded" / "document.bin").exists()
    source = PythiaSource(tmp_path / "sharded", batch_size=4, seq_len=15)  # a directory holding document.idx works
    for step in range(6):
        _assert_pythia_batch(source, sharded.rows, 4, step)
    both = PythiaSource([data.prefix, sharded.prefix], batch_size=4, seq_len=15)
    assert both.num_steps == 12
    _assert_pythia_batch(both, data.rows + sharded.rows, 4, 5)  # rows 20…23 of the first
    _assert_pythia_batch(both, data.rows + sharded.rows, 4, 6)  # rows 0…3 of the second
    mixed = both.step(5, slice(2, 4)).tokens, both.step(6, slice(0, 2)).tokens
    np.testing.assert_array_equal(np.concatenate(mixed), np.stack(data.rows[22:24] + sharded.rows[0:2]))
    shards[3].unlink()
    with pytest.raises(LmscopeError, match=r"1 of the 16 shards .* missing \(document-00003-of-00015.bin"):
        PythiaSource(sharded.prefix, batch_size=4, seq_len=15)


def test_pythia_defaults_are_1024_rows_of_2049_tokens(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=2 * 1024 + 5, seq_len=2048)
    source = open_source("pythia", data=[str(data.prefix)])
    assert (source.batch_size, source.row_length, source.num_steps, source.eos_token_id) == (1024, 2049, 2, 0)
    batch = replay_step(source, 1)
    assert batch.tokens.shape == (1024, 2049) and batch.rows[0] == 1024 and batch.rows[-1] == 2047
    np.testing.assert_array_equal(batch.tokens[17], data.rows[1024 + 17])


def test_pythia_train_steps_caps_the_steps(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=40, seq_len=7)
    source = PythiaSource(data.prefix, batch_size=4, seq_len=7, train_steps=6)
    assert source.num_steps == 6
    with pytest.raises(LmscopeError, match="holds 6 steps"):
        source.step(6)


def test_pythia_bad_inputs_name_the_file_and_the_fix(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=8, seq_len=15)
    with pytest.raises(LmscopeError, match="holds 16 tokens, not 2049"):
        PythiaSource(data.prefix, batch_size=4).step(0)
    with pytest.raises(LmscopeError, match="neither nothing.bin nor shards"):
        PythiaSource(tmp_path / "pile" / "nothing", batch_size=4, seq_len=15)
    (tmp_path / "pile" / "document.idx").write_bytes((tmp_path / "pile" / "document.idx").read_bytes()[:-3])
    with pytest.raises(LmscopeError, match="document.idx"):
        PythiaSource(data.prefix, batch_size=4, seq_len=15)
    with pytest.raises(LmscopeError, match="lacks data"):
        open_source("pythia")
    with pytest.raises(LmscopeError, match="carries no document ids"):
        find_document(PythiaSource(build_pythia(tmp_path / "p2", 8, 15).prefix, batch_size=4, seq_len=15), "doc-1")


def test_find_tokens_in_pythia_returns_exactly_the_planted_places(tmp_path: Path) -> None:
    plant = [(5, 0), (5, 9), (13, 12), (30, 3)]  # rows of steps 1, 1, 3, 7; one at a row's end (12 + 4 = 16)
    data = build_pythia(tmp_path / "pile", n_rows=40, seq_len=15, plant=plant)
    source = PythiaSource(data.prefix, batch_size=4, seq_len=15)
    result = find_tokens(source, PLANTED)
    assert [(m.step, m.row, m.row_offset) for m in result.matches] == [(1, 5, 0), (1, 5, 9), (3, 13, 12), (7, 30, 3)]
    assert result.first_step == 1 and result.match_steps == [1, 3, 7] and result.rows_scanned == 40
    part = find_tokens(source, PLANTED, range(2, 5))
    assert [(m.step, m.row) for m in part.matches] == [(3, 13)] and part.rows_scanned == 12
    assert find_tokens(source, PLANTED, limit=2).truncated
    assert find_tokens(source, PLANTED[1:] + [PLANTED[0]]).matches == []  # order matters
    # brute force over every row for a common short sequence
    needle = data.rows[9][4:6].tolist()
    found = {(m.row, m.row_offset) for m in find_tokens(source, needle).matches}
    truth = {(r, o) for r in range(40) for o in range(16 - 1) if data.rows[r][o : o + 2].tolist() == needle}
    assert found == truth
    with pytest.raises(LmscopeError, match="longer than a row"):
        find_tokens(source, list(range(17)))
    with pytest.raises(LmscopeError, match="step 10 is beyond"):
        find_tokens(source, PLANTED, range(8, 11))


# --- OLMo --------------------------------------------------------------------------------


@pytest.mark.parametrize("npy_header", [False, True])
def test_olmo_batches_follow_global_indices(tmp_path: Path, npy_header: bool) -> None:
    data = build_olmo(tmp_path / "olmo", lengths=[100, 37, 64, 5, 90], seq_len=16, npy_header=npy_header)
    assert len(data.instances) == 6 + 2 + 4 + 0 + 5
    source = OlmoSource(data.indices_path, data.files, batch_size=3, seq_len=16)
    assert source.num_steps == 17 // 3 and source.row_length == 16
    for step in range(source.num_steps):
        batch = source.step(step)
        want_indices = data.indices[3 * step : 3 * step + 3].tolist()
        assert batch.rows.tolist() == want_indices
        np.testing.assert_array_equal(batch.tokens, np.stack([data.instances[i] for i in want_indices]))
        assert batch.positions.tolist() == list(range(3 * step, 3 * step + 3))
        assert batch.origins == [data.origins[i] for i in want_indices]


def test_olmo_start_step_uint32_tokens_and_eos(tmp_path: Path) -> None:
    data = build_olmo(tmp_path / "olmo", lengths=[64, 64], seq_len=8, dtype="uint32")
    source = OlmoSource(data.indices_path, data.files, batch_size=4, seq_len=8, dtype="uint32", start_step=100, eos_token_id=7)
    assert source.num_steps == 104
    batch = source.step(101)
    assert batch.rows.tolist() == data.indices[4:8].tolist() and batch.positions.tolist() == [404, 405, 406, 407]
    np.testing.assert_array_equal(batch.tokens, np.stack([data.instances[i] for i in data.indices[4:8]]))
    with pytest.raises(LmscopeError, match="comes before .* first batch is step 100"):
        source.step(99)


def test_olmo_bad_inputs(tmp_path: Path) -> None:
    data = build_olmo(tmp_path / "olmo", lengths=[64, 33], seq_len=8)
    with pytest.raises(LmscopeError, match="not a whole number of uint32 tokens"):
        OlmoSource(data.indices_path, data.files, batch_size=2, seq_len=8, dtype="uint32")  # 33 uint16 = 66 bytes
    wrong_seq_len = OlmoSource(data.indices_path, data.files, batch_size=2, seq_len=16)  # 12 indices, 4 + 2 instances
    with pytest.raises(LmscopeError, match=r"names instance \d+, but the 2 token files hold 6 instances of 16 tokens"):
        for step in range(wrong_seq_len.num_steps):
            wrong_seq_len.step(step)
    with pytest.raises(LmscopeError, match="does not exist"):
        OlmoSource(tmp_path / "missing.npy", data.files, batch_size=2)
    bad = tmp_path / "bad_indices.npy"
    bad.write_bytes(b"\x00" * 6)
    with pytest.raises(LmscopeError, match="not a whole number of uint32 indices"):
        OlmoSource(bad, data.files, batch_size=2, seq_len=8)
    np.save(tmp_path / "with_header.npy", np.arange(8, dtype=np.uint16))
    with pytest.raises(LmscopeError, match="NumPy .npy header"):
        OlmoSource(data.indices_path, [tmp_path / "with_header.npy"], batch_size=2, seq_len=8)
    with pytest.raises(LmscopeError, match="lacks batch_size"):
        open_source("olmo", data=[str(f) for f in data.files], global_indices=str(data.indices_path))


# --- Amber -------------------------------------------------------------------------------


@pytest.mark.parametrize("unpadded", [False, True])
def test_amber_step_k_is_chunk_k(tmp_path: Path, unpadded: bool) -> None:
    data = build_amber(tmp_path / "amber", n_chunks=3, rows_per_chunk=7, seq_len=9, unpadded=unpadded)
    source = AmberSource(data.directory, chunks=3, rows_per_chunk=7, seq_len=9)
    for k in range(3):
        batch = source.step(k)
        np.testing.assert_array_equal(batch.tokens, np.array([ids for ids, _ in data.chunks[k]]))
        assert batch.rows.tolist() == list(range(7)) and batch.positions.tolist() == [7 * k + i for i in range(7)]
        assert [pieces[0].domain for pieces in batch.segments] == [source_name for _, source_name in data.chunks[k]]
        assert batch.origins[2].endswith(f"_{k:03d}.jsonl:3" if not unpadded else f"_{k}.jsonl:3")
    part = source.step(2, slice(3, 5))
    np.testing.assert_array_equal(part.tokens, np.array([ids for ids, _ in data.chunks[2][3:5]]))
    streamed = list(source.iter_tokens(1, block_rows=3))
    assert [len(block.rows) for block in streamed] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in streamed]), np.array([ids for ids, _ in data.chunks[1]]))
    assert sum(batch.domains().values()) == 7 * 10


def test_amber_find_tokens_and_bad_inputs(tmp_path: Path) -> None:
    data = build_amber(tmp_path / "amber", n_chunks=3, rows_per_chunk=7, seq_len=9)
    source = AmberSource(data.directory, chunks=4, rows_per_chunk=7, seq_len=9)
    needle = data.chunks[1][4][0][2:6]
    matches = find_tokens(source, needle, range(0, 3)).matches
    truth = [(k, line) for k in range(3) for line, (ids, _) in enumerate(data.chunks[k]) for o in range(10 - 3) if ids[o : o + 4] == needle]
    assert [(m.step, m.row) for m in matches] == truth and (1, 4) in truth
    with pytest.raises(LmscopeError, match=r"chunk 3 \(train_003.jsonl\) is not in"):
        source.step(3)
    with pytest.raises(LmscopeError, match="step 4 is beyond .* 4 steps"):
        source.step(4)
    with pytest.raises(LmscopeError, match="has more than 5 lines"):
        AmberSource(data.directory, chunks=3, rows_per_chunk=5, seq_len=9).step(0)
    with pytest.raises(LmscopeError, match="holds 10 token ids, not 2049"):
        AmberSource(data.directory, chunks=3, rows_per_chunk=7).step(0)
    lines = (data.directory / "train_001.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (data.directory / "train_001.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LmscopeError, match=r"train_001.jsonl:3 is not a JSON object"):
        source.step(1)
    with pytest.raises(LmscopeError, match="fewer than 8 lines"):
        AmberSource(data.directory, chunks=3, rows_per_chunk=9, seq_len=9).step(0, slice(7, 9))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_amber_compressed_chunks_and_empty_directories(tmp_path: Path, suffix: str) -> None:
    import gzip

    import zstandard

    data = build_amber(tmp_path / "amber", n_chunks=2, rows_per_chunk=6, seq_len=9)
    for k in range(2):
        plain = data.directory / f"train_{k:03d}.jsonl"
        packed = gzip.compress(plain.read_bytes()) if suffix == ".gz" else zstandard.ZstdCompressor().compress(plain.read_bytes())
        plain.with_name(plain.name + suffix).write_bytes(packed)
        plain.unlink()
    source = AmberSource(data.directory, chunks=2, rows_per_chunk=6, seq_len=9)
    np.testing.assert_array_equal(source.step(1, slice(4, 6)).tokens, np.array([ids for ids, _ in data.chunks[1][4:6]]))
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in source.iter_tokens(0, block_rows=4)]), np.array([ids for ids, _ in data.chunks[0]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmscopeError, match="holds no train_NNN.jsonl chunk"):
        AmberSource(tmp_path / "empty")
    with pytest.raises(LmscopeError, match="rows_per_chunk must be a positive integer, not 0"):
        open_source("amber", data=[str(data.directory)], rows_per_chunk=0)


# --- replay.json layouts -----------------------------------------------------------------


def test_replay_json_describes_each_layout(tmp_path: Path) -> None:
    pythia = build_pythia(tmp_path / "pythia", n_rows=12, seq_len=15)
    (tmp_path / "pythia" / "replay.json").write_text(json.dumps({"format": "pythia", "data": "document", "batch_size": 4, "seq_len": 15}))
    source = open_source(tmp_path / "pythia")
    assert isinstance(source, PythiaSource) and source.num_steps == 3
    assert open_source(tmp_path / "pythia", batch_size=2).num_steps == 6  # options override the file
    olmo = build_olmo(tmp_path / "olmo", lengths=[64, 64], seq_len=8)
    layout = {"format": "olmo", "global_indices": "global_indices.npy", "data": [f.name for f in olmo.files], "batch_size": 4, "seq_len": 8}
    (tmp_path / "olmo" / "replay.json").write_text(json.dumps(layout))
    np.testing.assert_array_equal(open_source(tmp_path / "olmo" / "replay.json").step(1).tokens, np.stack([olmo.instances[i] for i in olmo.indices[4:8]]))
    build_amber(tmp_path / "amber" / "train", n_chunks=2, rows_per_chunk=3, seq_len=9)
    (tmp_path / "amber" / "replay.json").write_text(json.dumps({"format": "amber", "data": ".", "chunks": 2, "rows_per_chunk": 3, "seq_len": 9}))
    assert open_source(tmp_path / "amber").step(1).tokens.shape == (3, 10)  # found under train/
    (tmp_path / "bad.json").write_text(json.dumps({"format": "pythia", "data": "x", "batchsize": 4}))
    with pytest.raises(LmscopeError, match="sets batchsize, which a pythia layout does not have"):
        open_source(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "gpt5", "data": "x"}))
    with pytest.raises(LmscopeError, match="known formats are pythia, olmo, amber"):
        open_source(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"format": "pythia",\n "data": }')
    with pytest.raises(LmscopeError, match=r"bad.json:2 is not valid JSON"):
        open_source(tmp_path / "bad.json")
    by_model = open_source("EleutherAI/pythia-160m-deduped", data=[str(pythia.prefix)], batch_size=4, seq_len=15)
    assert isinstance(by_model, PythiaSource) and by_model.num_steps == 3
    with pytest.raises(LmscopeError, match="names no replay source"):
        open_source("gpt-neo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmscopeError, match="neither a mini suite"):
        open_source(tmp_path / "empty")
