"""Activation store reader: validation, random access, metadata and the shuffled stream.

The capture here is an embedding lookup (row = table[token] + position code), so every
stored row can be recomputed independently from the row index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscope.activations import ActivationStore, iter_contexts, write_activations
from lmscope.errors import LmscopeError

VOCAB, D, CTX, N_TOKENS = 50, 6, 8, 1000
TABLE = torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(0))
HEADS = torch.randn(VOCAB, 2, 3, generator=torch.Generator().manual_seed(1))


def _capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    position_code = torch.arange(ids.shape[1], dtype=torch.float32)[None, :, None]
    return {"resid": TABLE[ids] + position_code, "z": HEADS[ids]}


def _documents() -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [(index, rng.integers(2, VOCAB, size=int(rng.integers(3, 30)))) for index in range(200)]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "store"
    contexts = iter_contexts(_documents(), CTX, N_TOKENS, bos_token_id=1)
    write_activations(_capture, contexts, ["resid", "z"], out, batch_size=5, shard_tokens=64, meta={"capture": "lookup"})
    return out


@pytest.fixture(scope="module")
def store(store_dir: Path) -> ActivationStore:
    return ActivationStore.open(store_dir, verify=True)


def _expected_resid(store: ActivationStore, rows: np.ndarray) -> torch.Tensor:
    """Recompute rows from the row index alone: token embedding plus position in the context."""
    meta = store.metadata
    first_row_of_context = np.searchsorted(meta["context"], meta["context"][rows], side="left")
    return TABLE[torch.from_numpy(meta["token"][rows].astype(np.int64))] + torch.from_numpy(rows - first_row_of_context).float()[:, None]


def _copy(store_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(store_dir, target)
    return target


def test_description(store: ActivationStore) -> None:
    assert store.hooks == ["resid", "z"] and store.n_rows == N_TOKENS and store.dtype == "float32"
    assert store.row_shape("resid") == (D,) and store.row_shape("z") == (2, 3) and store.d("z") == 6
    assert store.meta == {"capture": "lookup"} and store.n_shards > 10
    assert store.documents is None


def test_random_access_matches_recomputation(store: ActivationStore) -> None:
    everything = store.rows("resid", slice(None))
    assert everything.shape == (N_TOKENS, D)
    torch.testing.assert_close(everything, _expected_resid(store, np.arange(N_TOKENS)), rtol=0, atol=0)
    assert torch.equal(store.rows("resid", slice(60, 200)), everything[60:200])  # crosses shard boundaries
    assert torch.equal(store.rows("resid", slice(5, 300, 7)), everything[5:300:7])
    picks = np.array([999, 0, 64, 64, 500, -1])
    assert torch.equal(store.rows("resid", picks), everything[torch.from_numpy(picks % N_TOKENS)])
    assert torch.equal(store.rows("resid", 17), everything[17])
    mask = store.metadata["position"] == -1
    assert torch.equal(store.rows("resid", mask), everything[torch.from_numpy(mask)])
    assert store.rows("resid", slice(10, 10)).shape == (0, D)
    assert store.rows("z", slice(0, 4)).shape == (4, 2, 3)
    tokens = torch.from_numpy(store.metadata["token"][:4].astype(np.int64))
    assert torch.equal(store.rows("z", slice(0, 4)), HEADS[tokens])
    with pytest.raises(IndexError):
        store.rows("resid", N_TOKENS)


def test_metadata(store: ActivationStore) -> None:
    meta = store.metadata
    assert {k: v.dtype.name for k, v in meta.items()} == {"token": "int32", "doc_index": "int64", "position": "int32", "context": "int64"}
    docs = dict(_documents())
    bos = meta["position"] == -1
    assert np.all(meta["token"][bos] == 1)
    rows = np.nonzero(~bos)[0]
    assert all(docs[d][p] == t for d, p, t in zip(meta["doc_index"][rows], meta["position"][rows], meta["token"][rows]))


def _epoch(store: ActivationStore, seed: int, **kwargs) -> tuple[list[torch.Tensor], np.ndarray]:
    batches, rows = [], []
    for batch, meta in store.stream("resid", 32, seed, with_metadata=True, **kwargs):
        batches.append(batch)
        rows.append(meta["row"])
    return batches, np.concatenate(rows)


def test_stream_yields_every_row_once_deterministically(store: ActivationStore) -> None:
    batches, rows = _epoch(store, seed=5)
    assert sorted(rows.tolist()) == list(range(N_TOKENS))
    assert [b.shape[0] for b in batches] == [32] * (N_TOKENS // 32) + [N_TOKENS % 32]
    # the rows are what the metadata says they are
    torch.testing.assert_close(torch.cat(batches), _expected_resid(store, rows), rtol=0, atol=0)
    again, again_rows = _epoch(store, seed=5)
    assert np.array_equal(rows, again_rows) and all(torch.equal(a, b) for a, b in zip(batches, again))
    other_seed = _epoch(store, seed=6)[1]
    other_epoch = _epoch(store, seed=5, epoch=1)[1]
    assert not np.array_equal(rows, other_seed) and not np.array_equal(rows, other_epoch)
    assert sorted(other_seed.tolist()) == list(range(N_TOKENS))
    # the buffer mixes shards: the first batch draws from several of them
    starts = [s["row_start"] for s in store.manifest["shards"]]
    assert len(set(np.searchsorted(starts, rows[:32], side="right"))) >= 3


def test_stream_metadata_is_aligned(store: ActivationStore) -> None:
    batch, meta = next(iter(store.stream("resid", 16, 0, with_metadata=True)))
    for name in ("token", "doc_index", "position"):
        assert np.array_equal(meta[name], store.metadata[name][meta["row"]])
    assert torch.equal(batch, store.rows("resid", meta["row"]))


def test_stream_options(store: ActivationStore) -> None:
    ordered = list(store.stream("resid", 100, shuffle=False))
    assert torch.equal(torch.cat(ordered), store.rows("resid", slice(None)))
    dropped = list(store.stream("z", 64, seed=1, drop_last=True, buffer_shards=1))
    assert all(b.shape == (64, 2, 3) for b in dropped) and len(dropped) == N_TOKENS // 64
    tiny_buffer = _epoch(store, seed=2, buffer_shards=1)[1]
    assert sorted(tiny_buffer.tolist()) == list(range(N_TOKENS))
    with pytest.raises(LmscopeError, match="batch size"):
        store.stream("resid", 0)


def test_unknown_hook_lists_the_available_ones(store: ActivationStore) -> None:
    for call in (lambda: store.stream("blocks.0.hook_resid_post", 8), lambda: store.rows("nope", 0)):
        with pytest.raises(LmscopeError, match="it holds resid, z"):
            call()


def test_missing_shard_is_named(store_dir: Path, tmp_path: Path) -> None:
    copy = _copy(store_dir, tmp_path)
    (copy / "z" / "shard_00003.safetensors").unlink()
    with pytest.raises(LmscopeError, match=r"z/shard_00003\.safetensors is missing"):
        ActivationStore.open(copy)


def test_truncated_shard_is_named(store_dir: Path, tmp_path: Path) -> None:
    copy = _copy(store_dir, tmp_path)
    path = copy / "resid" / "shard_00001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LmscopeError, match=r"resid/shard_00001\.safetensors is truncated"):
        ActivationStore.open(copy)


def test_corrupt_bytes_are_found_by_verify(store_dir: Path, tmp_path: Path) -> None:
    copy = _copy(store_dir, tmp_path)
    path = copy / "resid" / "shard_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))
    ActivationStore.open(copy)  # same size, well-formed header: only the hash can tell
    with pytest.raises(LmscopeError, match=r"resid/shard_00002\.safetensors does not match its sha256"):
        ActivationStore.open(copy, verify=True)


def test_corrupt_header_is_named(store_dir: Path, tmp_path: Path) -> None:
    copy = _copy(store_dir, tmp_path)
    path = copy / "rows" / "shard_00004.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(LmscopeError, match=r"rows/shard_00004\.safetensors is corrupt"):
        ActivationStore.open(copy)


def test_bad_manifests(store_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="does not exist"):
        ActivationStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmscopeError, match="not an activation store"):
        ActivationStore.open(tmp_path / "empty")
    copy = _copy(store_dir, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(LmscopeError, match="incomplete.*rerun"):
        ActivationStore.open(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "n_rows": 5}))
    with pytest.raises(LmscopeError, match="records 5 rows"):
        ActivationStore.open(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(LmscopeError, match="manifest.json is unreadable"):
        ActivationStore.open(copy)
