"""Activation store writer: round trip against the model itself, resume after SIGKILL, refusals.

Run as a script (``python tests/test_activations_store.py OUT DELAY``) it performs the
reference capture with a pause per batch; the resume test kills that process.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402

from lmscope.activations import ActivationStore, capture_corpus_activations, iter_contexts, write_activations  # noqa: E402
from lmscope.activations.store import LOCK_FILE  # noqa: E402
from lmscope.errors import LmscopeError  # noqa: E402

BOS = 1
HOOKS = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "ln_final.hook_normalized"]
CTX, N_TOKENS, BATCH, SHARD_TOKENS = 16, 600, 4, 96
REPO = Path(__file__).resolve().parents[1]


def _documents() -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(index, rng.integers(3, VOCAB, size=int(rng.integers(1, 45))).astype(np.uint16)) for index in range(80)]


def _hidden_states_capture(model: torch.nn.Module, delay: float = 0.0):
    """Capture from ``output_hidden_states``: resid_pre of block i is hidden_states[i]; the last one is after ln_f."""

    def capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if delay:
            time.sleep(delay)
        states = model(ids, output_hidden_states=True).hidden_states
        return {"blocks.0.hook_resid_pre": states[0], "blocks.2.hook_resid_pre": states[2], "ln_final.hook_normalized": states[-1]}

    return capture


def _write(out: Path, *, delay: float = 0.0, model: torch.nn.Module | None = None, **overrides) -> dict:
    kwargs = dict(batch_size=BATCH, shard_tokens=SHARD_TOKENS, dtype="float32", meta={"model": "tiny-gpt2", "seed": 0},
                  documents={i: {"id": f"doc-{i}", "domain": "synthetic"} for i, _ in _documents()})
    kwargs.update(overrides)
    contexts = iter_contexts(_documents(), CTX, N_TOKENS, bos_token_id=BOS)
    capture = _hidden_states_capture(model or tiny_model("gpt2"), delay)
    return write_activations(capture, contexts, HOOKS, out, **kwargs)


def _assert_stores_equal(a: Path, b: Path) -> None:
    """Every shard's tensors and row index equal, bitwise; manifests list the same files and hashes."""
    left, right = ActivationStore.open(a, verify=True), ActivationStore.open(b, verify=True)
    assert left.manifest["shards"] == right.manifest["shards"]
    for hook in HOOKS:
        for shard in range(left.n_shards):
            x, y = left._read_shard(hook, shard), right._read_shard(hook, shard)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    for name, column in left.metadata.items():
        assert np.array_equal(column, right.metadata[name])
    assert left.documents.equals(right.documents)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> Path:
    out = tmp_path_factory.mktemp("reference") / "store"
    _write(out, model=model)
    return out


def test_round_trip_equals_the_model_run_context_by_context(reference: Path, model: torch.nn.Module) -> None:
    store = ActivationStore.open(reference, verify=True)
    assert store.n_rows == N_TOKENS and store.hooks == HOOKS and store.meta == {"model": "tiny-gpt2", "seed": 0}
    docs = dict(_documents())
    meta = store.metadata
    # the row index is right: every row's token is the document's token at that position (BOS at -1)
    for row in range(store.n_rows):
        doc, position, token = int(meta["doc_index"][row]), int(meta["position"][row]), int(meta["token"][row])
        assert token == (BOS if position == -1 else int(docs[doc][position]))
    # independent truth: run the model on each context alone, unpadded, and compare per hook
    contexts = list(iter_contexts(_documents(), CTX, N_TOKENS, bos_token_id=BOS))
    assert len(contexts) == store.manifest["n_contexts"]
    row = 0
    with torch.no_grad():
        for number, context in enumerate(contexts):
            n = context.n_valid
            states = model(torch.from_numpy(context.tokens[None, :n]), output_hidden_states=True).hidden_states
            truth = {"blocks.0.hook_resid_pre": states[0], "blocks.2.hook_resid_pre": states[2], "ln_final.hook_normalized": states[-1]}
            assert np.all(meta["context"][row : row + n] == number)
            for hook in HOOKS:
                torch.testing.assert_close(store.rows(hook, slice(row, row + n)), truth[hook][0], rtol=1e-5, atol=1e-5)
            row += n
    assert row == store.n_rows
    # anti-tautology: the hooks hold different tensors
    assert not torch.allclose(store.rows(HOOKS[0], slice(0, 50)), store.rows(HOOKS[1], slice(0, 50)))
    assert store.document_ids(meta["doc_index"][:1]) == ["doc-0"]
    assert set(store.documents.column("domain").to_pylist()) == {"synthetic"}


def test_manifest_describes_every_shard(reference: Path) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["hooks"] == HOOKS and manifest["ctx_len"] == CTX
    assert manifest["hooks"]["blocks.0.hook_resid_pre"] == {
        "dir": "blocks.0.hook_resid_pre", "dtype": "float32", "row_shape": [32], "d": 32, "shape": [N_TOKENS, 32]}
    shards = manifest["shards"]
    assert len(shards) > 3 and shards[0]["row_start"] == 0 and shards[-1]["row_end"] == N_TOKENS
    for before, after in zip(shards, shards[1:]):
        assert before["row_end"] == after["row_start"] and before["context_end"] == after["context_start"]
    for shard in shards[:-1]:  # shards close at the first batch boundary at or past shard_tokens rows
        assert SHARD_TOKENS <= shard["row_end"] - shard["row_start"] < SHARD_TOKENS + BATCH * CTX
        assert (shard["context_end"] - shard["context_start"]) % BATCH == 0
    assert sorted(p.name for p in reference.iterdir()) == sorted([".lock", "documents.parquet", "manifest.json", "rows", *HOOKS])


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, reference: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, __file__, str(out), "0.15"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        time.sleep(0.07)  # land somewhere inside the next shard
        assert child.poll() is None, f"the capture ended before it could be killed: {child.stderr.read().decode()}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 2 <= len(killed["shards"]) < 7
    with pytest.raises(LmscopeError, match="incomplete"):
        ActivationStore.open(out)
    ActivationStore.open(out, allow_incomplete=True, verify=True)  # what is listed is readable meanwhile

    _write(out, model=model)
    _assert_stores_equal(out, reference)


def test_resume_after_a_crash_cleans_orphans_and_matches(tmp_path: Path, reference: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "crashed"
    calls = 0
    capture = _hidden_states_capture(model)

    def crashing(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if calls == 7:
            raise RuntimeError("out of memory")
        return capture(ids)

    contexts = iter_contexts(_documents(), CTX, N_TOKENS, bos_token_id=BOS)
    with pytest.raises(RuntimeError):
        write_activations(crashing, contexts, HOOKS, out, batch_size=BATCH, shard_tokens=SHARD_TOKENS,
                          meta={"model": "tiny-gpt2", "seed": 0})
    listed = len(json.loads((out / "manifest.json").read_text())["shards"])
    # what a kill between a shard's files and its manifest entry leaves: an unlisted shard, temporaries
    (out / HOOKS[1] / f"shard_{listed:05d}.safetensors").write_bytes(b"half a shard")
    (out / "rows" / f".shard_{listed:05d}.safetensors.abc.tmp").write_bytes(b"junk")
    (out / ".manifest.json.xyz.tmp").write_text("{")
    _write(out, model=model)
    _assert_stores_equal(out, reference)
    assert not list(out.rglob("*.tmp"))


def test_damaged_shard_is_rebuilt_on_rerun(tmp_path: Path, reference: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "damaged"
    _write(out, model=model)
    victim = out / HOOKS[2] / "shard_00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(LmscopeError, match="shard_00002.*sha256"):
        ActivationStore.open(out, verify=True)
    _write(out, model=model)
    _assert_stores_equal(out, reference)


def test_rerun_of_a_finished_store_changes_nothing(reference: Path, model: torch.nn.Module) -> None:
    before = (reference / "manifest.json").read_bytes()
    calls = []
    contexts = iter_contexts(_documents(), CTX, N_TOKENS, bos_token_id=BOS)
    write_activations(lambda ids: calls.append(ids) or {}, contexts, HOOKS, reference, batch_size=BATCH,
                      shard_tokens=SHARD_TOKENS, meta={"model": "tiny-gpt2", "seed": 0},
                      documents={i: {"id": f"doc-{i}", "domain": "synthetic"} for i, _ in _documents()})
    assert not calls and (reference / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("change", "named"),
    [({"dtype": "bfloat16"}, "dtype"), ({"meta": {"model": "other", "seed": 0}}, "meta.model"), ({"batch_size": 8}, "batch_size")],
)
def test_resume_with_other_arguments_is_refused(tmp_path: Path, model: torch.nn.Module, change: dict, named: str) -> None:
    out = tmp_path / "store"
    contexts = list(iter_contexts(_documents(), CTX, 64, bos_token_id=BOS))
    write_activations(_hidden_states_capture(model), contexts, HOOKS, out, batch_size=BATCH, shard_tokens=32, meta={"model": "tiny-gpt2", "seed": 0})
    kwargs = {"batch_size": BATCH, "shard_tokens": 32, "meta": {"model": "tiny-gpt2", "seed": 0}, **change}
    with pytest.raises(LmscopeError, match=f"different arguments.*{named}.*--overwrite"):
        write_activations(_hidden_states_capture(model), contexts, HOOKS, out, **kwargs)
    manifest = write_activations(_hidden_states_capture(model), contexts, HOOKS, out, overwrite=True, **kwargs)
    assert manifest["config"]["dtype"] == kwargs.get("dtype", "float32") and manifest["complete"]
    assert ActivationStore.open(out, verify=True).rows(HOOKS[0], 0).dtype == getattr(torch, kwargs.get("dtype", "float32"))


def test_a_store_without_shards_restarts_with_new_arguments(tmp_path: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "store"
    contexts = list(iter_contexts(_documents(), CTX, 64, bos_token_id=BOS))

    def failing(ids: torch.Tensor) -> dict:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError):
        write_activations(failing, contexts, HOOKS, out, batch_size=8)
    manifest = write_activations(_hidden_states_capture(model), contexts, HOOKS, out, batch_size=2)  # nothing to protect
    assert manifest["complete"] and manifest["config"]["batch_size"] == 2


def test_resume_with_other_contexts_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "store"
    write_activations(_hidden_states_capture(model), iter_contexts(_documents(), CTX, 64, bos_token_id=BOS), HOOKS, out,
                      batch_size=BATCH, shard_tokens=32)
    other = iter_contexts(_documents()[1:], CTX, 64, bos_token_id=BOS)
    with pytest.raises(LmscopeError, match="different contexts.*--overwrite"):
        write_activations(_hidden_states_capture(model), other, HOOKS, out, batch_size=BATCH, shard_tokens=32)


def test_refusals(tmp_path: Path, model: torch.nn.Module) -> None:
    contexts = list(iter_contexts(_documents(), CTX, 32, bos_token_id=BOS))
    capture = _hidden_states_capture(model)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(LmscopeError, match="not empty.*notes.txt"):
        write_activations(capture, contexts, HOOKS, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]  # left untouched
    with pytest.raises(LmscopeError, match="attention pattern"):
        write_activations(capture, contexts, ["blocks.0.attn.hook_pattern"], tmp_path / "a")
    with pytest.raises(LmscopeError, match="no tensor for hook 'blocks.1.hook_mlp_out'.*blocks.0.hook_resid_pre"):
        write_activations(capture, contexts, ["blocks.1.hook_mlp_out"], tmp_path / "b")
    with pytest.raises(LmscopeError, match=r"shape \(2, 4, 16, 16\).*\[batch, pos, \.\.\.\]"):
        write_activations(lambda ids: {"x": torch.zeros(ids.shape[0], 4, 16, 16)}, contexts, ["x"], tmp_path / "c", batch_size=2)
    with pytest.raises(LmscopeError, match="unknown activation dtype"):
        write_activations(capture, contexts, HOOKS, tmp_path / "d", dtype="int8")
    with pytest.raises(LmscopeError, match="no tokens"):
        write_activations(capture, [], HOOKS, tmp_path / "e")
    (tmp_path / "locked").mkdir()
    with open(tmp_path / "locked" / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LmscopeError, match="another process"):
            write_activations(capture, contexts, HOOKS, tmp_path / "locked")


class _FakeHookedModel:
    """The HookedModel surface the job uses, over ``output_hidden_states``."""

    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module) -> None:
        self.capture = _hidden_states_capture(model)

    def run_with_cache(self, ids, names, attention_mask=None, need_logits=False):
        cache = self.capture(ids)
        return None, {name: cache[name] for name in names}


class _FakeCorpus:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        (path / "manifest.json").write_text("{}")

    def iter_documents(self, split=None, domain=None):
        for index, tokens in _documents():
            if split is None or (index % 5 == 0) == (split == "heldout"):
                yield index, f"doc-{index}", "synthetic", tokens


def test_capture_corpus_activations_job(tmp_path: Path, model: torch.nn.Module) -> None:
    out = tmp_path / "store"
    manifest = capture_corpus_activations(_FakeHookedModel(model), _FakeCorpus(tmp_path / "corpus"), HOOKS[:2], 100, CTX, out,
                                          batch_size=3, shard_tokens=40, bos_token_id=BOS, meta={"model": "tiny"})
    store = ActivationStore.open(out, verify=True)
    assert store.n_rows == 100 and manifest["meta"]["split"] == "heldout" and manifest["meta"]["model"] == "tiny"
    assert manifest["meta"]["corpus"]["manifest_sha256"] is not None
    assert set(store.metadata["doc_index"] % 5) == {0}
    assert store.document_ids([0, 5]) == ["doc-0", "doc-5"]


if __name__ == "__main__":  # the child process of the SIGKILL test
    _write(Path(sys.argv[1]), delay=float(sys.argv[2]))
