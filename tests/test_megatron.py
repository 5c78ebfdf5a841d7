"""Megatron MMapIndexedDataset: byte layout checked against a hand-built file, round trips, corruption."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from lmscope.data.megatron import MegatronDataset, write_megatron_dataset
from lmscope.errors import LmscopeError

SEQUENCES = [[1, 2, 3], [65535], [5, 6]]


def _hand_built(prefix: Path, code: int = 8, version: int = 1, magic: bytes = b"MMIDIDX\x00\x00") -> None:
    """The tiny dataset SEQUENCES as uint16, written byte by byte from the format description."""
    data = struct.pack("<6H", 1, 2, 3, 65535, 5, 6)
    index = (
        magic
        + struct.pack("<Q", version)
        + struct.pack("<B", code)
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 4)  # doc_idx entries
        + struct.pack("<3i", 3, 1, 2)  # sizes
        + struct.pack("<3q", 0, 6, 8)  # byte offsets: 3 × 2 bytes, then 1 × 2 bytes
        + struct.pack("<4q", 0, 1, 2, 3)  # one document per sequence
    )
    prefix.with_name(prefix.name + ".bin").write_bytes(data)
    prefix.with_name(prefix.name + ".idx").write_bytes(index)


def test_reader_reads_a_hand_built_file(tmp_path: Path) -> None:
    _hand_built(tmp_path / "hand")
    ds = MegatronDataset(tmp_path / "hand")
    assert len(ds) == 3 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(3)] == SEQUENCES
    assert ds.sizes.tolist() == [3, 1, 2] and ds.pointers.tolist() == [0, 6, 8]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3] and ds.num_documents == 3
    assert ds[-1].tolist() == [5, 6] and [a.tolist() for a in ds[0:2]] == SEQUENCES[:2]
    assert ds.get(0, offset=1).tolist() == [2, 3] and ds.get(0, offset=1, length=1).tolist() == [2]
    assert ds.num_tokens == 6
    assert MegatronDataset(tmp_path / "hand.idx")[1].tolist() == [65535]  # a file path works as prefix
    with pytest.raises(IndexError):
        ds[3]


def test_getitem_is_a_read_only_view_of_the_mapped_file(tmp_path: Path) -> None:
    _hand_built(tmp_path / "hand")
    ds = MegatronDataset(tmp_path / "hand")
    item = ds[0]
    assert not item.flags.owndata and not item.flags.writeable
    assert np.shares_memory(item, ds[0])  # two reads of one sequence are views of the same mapped bytes


def test_writer_produces_the_hand_built_bytes(tmp_path: Path) -> None:
    _hand_built(tmp_path / "hand")
    bin_path, idx_path = write_megatron_dataset(tmp_path / "written", SEQUENCES, dtype=np.uint16)
    assert bin_path.read_bytes() == (tmp_path / "hand.bin").read_bytes()
    assert idx_path.read_bytes() == (tmp_path / "hand.idx").read_bytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.float64])
def test_round_trip_every_unambiguous_dtype(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 100, size=n).astype(dtype) for n in (0, 1, 7, 2049, 3)]
    write_megatron_dataset(tmp_path / "ds", sequences, dtype=dtype, doc_idx=[0, 2, 5])
    ds = MegatronDataset(tmp_path / "ds")
    assert ds.dtype == np.dtype(dtype) and len(ds) == 5
    for got, want in zip(ds, sequences):
        np.testing.assert_array_equal(got, want)
    assert list(ds.document_sequences(1)) == [2, 3, 4]


def test_empty_dataset_and_pickling(tmp_path: Path) -> None:
    write_megatron_dataset(tmp_path / "empty", [], dtype=np.uint16)
    assert len(MegatronDataset(tmp_path / "empty")) == 0
    _hand_built(tmp_path / "hand")
    clone = pickle.loads(pickle.dumps(MegatronDataset(tmp_path / "hand")))
    assert clone[2].tolist() == [5, 6]


def test_ambiguous_code_7_needs_the_caller_to_choose(tmp_path: Path) -> None:
    values = struct.pack("<2f", 1.5, -2.0)
    (tmp_path / "f.bin").write_bytes(values)
    index = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 7, 1, 2) + struct.pack("<i", 2) + struct.pack("<q", 0) + struct.pack("<2q", 0, 1)
    (tmp_path / "f.idx").write_bytes(index)
    with pytest.raises(LmscopeError, match="code 7.*float32.*float64"):
        MegatronDataset(tmp_path / "f")
    assert MegatronDataset(tmp_path / "f", dtype="float32")[0].tolist() == [1.5, -2.0]
    _hand_built(tmp_path / "hand")
    with pytest.raises(LmscopeError, match="uint16"):
        MegatronDataset(tmp_path / "hand", dtype="int32")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: _hand_built(p, magic=b"NOTANIDX!"), "not a Megatron MMapIndexedDataset index"),
        (lambda p: _hand_built(p, magic=b"TNTIDX\x00\x00\x00"), "non-mmap IndexedDataset"),
        (lambda p: _hand_built(p, version=2), "version 2"),
        (lambda p: _hand_built(p, code=9), "unknown dtype code 9"),
    ],
)
def test_bad_headers_name_the_file_and_the_problem(tmp_path: Path, corrupt, message: str) -> None:
    prefix = tmp_path / "ds"
    corrupt(prefix)
    with pytest.raises(LmscopeError, match=message) as err:
        MegatronDataset(prefix)
    assert "ds.idx" in str(err.value)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    _hand_built(prefix)
    idx, data = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    full_idx, full_bin = idx.read_bytes(), data.read_bytes()
    for cut in (0, 20, len(full_idx) - 1):
        idx.write_bytes(full_idx[:cut])
        with pytest.raises(LmscopeError, match="ds.idx.*truncated"):
            MegatronDataset(prefix)
    idx.write_bytes(full_idx + b"\x00" * 8)
    with pytest.raises(LmscopeError, match="beyond"):
        MegatronDataset(prefix)
    idx.write_bytes(full_idx)
    data.write_bytes(full_bin[:-1])
    with pytest.raises(LmscopeError, match="ds.bin.*truncated"):
        MegatronDataset(prefix)
    data.unlink()
    with pytest.raises(LmscopeError, match="ds.bin.*does not exist"):
        MegatronDataset(prefix)


def test_writer_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="sequence 1 holds values from 0 to 70000"):
        write_megatron_dataset(tmp_path / "a", [[1], [0, 70000]], dtype=np.uint16)
    with pytest.raises(LmscopeError, match="1-D"):
        write_megatron_dataset(tmp_path / "b", [[[1, 2]]], dtype=np.uint16)
    with pytest.raises(LmscopeError, match="needs integers"):
        write_megatron_dataset(tmp_path / "c", [[1.5]], dtype=np.int32)
    with pytest.raises(LmscopeError, match="unambiguously"):
        write_megatron_dataset(tmp_path / "d", [[1.5]], dtype=np.float32)
    with pytest.raises(LmscopeError, match="doc_idx"):
        write_megatron_dataset(tmp_path / "e", [[1], [2]], dtype=np.uint16, doc_idx=[0, 1])
    for name in "abcde":
        assert not (tmp_path / f"{name}.idx").exists() and not (tmp_path / f"{name}.bin").exists()
