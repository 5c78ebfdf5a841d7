"""SAE training streamed from a model, against independent truths.

- The stream's rows over one pass are, as a multiset of (hook A, hook B) pairs, exactly the rows
  ``capture_corpus_activations`` stores for the same corpus and settings (so rows stay paired
  across hooks), and each batch comes only from the rows the mixing buffer can have seen.
- Several SAEs trained from one stream equal the same SAEs trained one stream each.
- A streamed run killed mid-way and restarted ends bitwise identical to an uninterrupted one.
- The ``lmscope sae train --stream`` command trains one SAE per hook end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_fixtures import build_bpe_tokenizer, corpus_records, write_jsonl
from lmscope.activations import ActivationStore, capture_corpus_activations
from lmscope.cli import main
from lmscope.data.tokenize_job import tokenize_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.models.hooks import HookedModel
from lmscope.sae.io import load_sae
from lmscope.sae.model import SparseAutoencoder
from lmscope.sae.stream import ActivationStream, StreamConfig
from lmscope.sae.train import CHECKPOINT_FILE, REPLAY_TASK, TRAIN_LOG_FILE, SaeTrainConfig, train_saes_from_model
from tiny_models import tiny_model

VOCAB, CTX, BATCH = 400, 16, 32
A, B = "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"  # d = 32 and 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """This module runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sae_stream")
    model_dir = root / "model"
    build_bpe_tokenizer(model_dir, vocab_size=VOCAB)
    tiny_model("gpt_neox", vocab_size=VOCAB).save_pretrained(model_dir)
    documents = write_jsonl(root / "docs.jsonl", corpus_records(60))
    tokenize_corpus(documents, str(model_dir), root / "corpus", heldout_fraction=0.3)
    return {"root": root, "model": model_dir, "corpus": root / "corpus"}


@pytest.fixture(scope="module")
def hooked(workspace: dict[str, Path]) -> HookedModel:
    return HookedModel.from_spec(str(workspace["model"]), device="cpu")


@pytest.fixture(scope="module")
def corpus(workspace: dict[str, Path]) -> TokenizedCorpus:
    return TokenizedCorpus.open(workspace["corpus"])


def _paired(rows: dict[str, torch.Tensor]) -> np.ndarray:
    """Each token's rows of A and B side by side, sorted lexicographically: the multiset of pairs."""
    both = torch.cat([rows[A], rows[B]], dim=1).numpy()
    return both[np.lexsort(both.T[::-1])]


@pytest.mark.parametrize("bos", [None, 0])
def test_one_pass_is_the_stored_rows_paired_across_hooks(bos: int | None, hooked: HookedModel, corpus: TokenizedCorpus,
                                                         tmp_path: Path) -> None:
    capture_corpus_activations(hooked, corpus, [A, B], 500, CTX, tmp_path / "store", split="train", batch_size=8, bos_token_id=bos)
    store = ActivationStore.open(tmp_path / "store")
    stored = {hook: store.rows(hook, slice(None)) for hook in (A, B)}
    assert store.n_rows == 500 and stored[A].shape == (500, 32) and stored[B].shape == (500, 64)

    config = StreamConfig(ctx=CTX, buffer_rows=4 * BATCH, n_tokens=500, split="train", bos_token_id=bos)
    batches = list(ActivationStream(hooked, corpus, [A, B], config, batch_size=BATCH, seed=3, passes=1))
    assert all(b[A].dtype == torch.float32 and b[A].shape == (BATCH, 32) and b[B].shape == (BATCH, 64) for b in batches[:-1])
    assert sum(len(b[A]) for b in batches) == 500  # every row once, the last batch short (500 = 15·32 + 20)
    streamed = {hook: torch.cat([b[hook] for b in batches]) for hook in (A, B)}
    assert np.array_equal(_paired(streamed), _paired(stored))  # same rows, and A's row n is B's row n's token
    assert not torch.equal(streamed[A], stored[A])  # shuffled

    # the buffer: batches 2r, 2r+1 (a refill of 64 rows out of 128) hold only rows of the first 128 + 64·r forward rows
    store_order = stored[A].numpy()
    for index, batch in enumerate(batches[:-4]):
        seen = {row.tobytes() for row in store_order[: 4 * BATCH + 2 * BATCH * (index // 2)]}
        assert all(row.tobytes() in seen for row in batch[A].numpy()), index


def test_stream_is_a_function_of_its_seed(hooked: HookedModel, corpus: TokenizedCorpus) -> None:
    config = StreamConfig(ctx=CTX, buffer_rows=4 * BATCH, n_tokens=300)

    def run(seed: int, passes: int | None = 1, n: int | None = None) -> list[dict[str, torch.Tensor]]:
        stream = iter(ActivationStream(hooked, corpus, [A], config, batch_size=BATCH, seed=seed, passes=passes))
        return list(stream) if n is None else [next(stream) for _ in range(n)]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a[A], b[A]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][A], other[0][A])
    assert torch.equal(torch.cat([b[A] for b in first]).sort(0).values, torch.cat([b[A] for b in other]).sort(0).values)
    # endless: past the 300 rows of a pass the contexts start again; every row is one of the pass's rows
    endless = torch.cat([b[A] for b in run(0, passes=None, n=30)])
    assert endless.shape == (30 * BATCH, 32)
    one_pass = {row.tobytes() for row in torch.cat([b[A] for b in first]).numpy()}
    assert all(row.tobytes() in one_pass for row in endless.numpy())


def _config(hook: str = A, **overrides) -> SaeTrainConfig:
    base = dict(hook=hook, arch="topk", width=64, k=4, batch_size=BATCH, total_tokens=BATCH * 24, checkpoint_every=1000,
                log_every=1, dead_tokens=64)
    return SaeTrainConfig(**{**base, **overrides})


STREAM = StreamConfig(ctx=CTX, buffer_rows=4 * BATCH, n_tokens=400)


def _assert_same(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _log(out_dir: Path) -> dict[str, list]:
    return pq.read_table(out_dir / TRAIN_LOG_FILE).to_pydict()


def test_saes_trained_from_one_stream_equal_those_trained_alone(hooked: HookedModel, corpus: TokenizedCorpus,
                                                                 tmp_path: Path) -> None:
    sae = _config(A, seed=1)
    transcoder = _config("blocks.0.hook_resid_pre", out_hook=B, arch="relu", k=None, seed=2, l1_coefficient=0.5)
    together = train_saes_from_model([sae, transcoder], hooked, corpus, [tmp_path / "a", tmp_path / "t"], stream=STREAM,
                                     seed=5, device="cpu")
    alone = [train_saes_from_model([config], hooked, corpus, [tmp_path / f"alone{i}"], stream=STREAM, seed=5, device="cpu")[0]
             for i, config in enumerate((sae, transcoder))]
    for one, other, a_dir, b_dir in zip(together, alone, ("a", "t"), ("alone0", "alone1")):
        _assert_same(one, other)
        assert _log(tmp_path / a_dir) == _log(tmp_path / b_dir)
    assert together[1].shape.out_hook == B and together[1].shape.output_dim == 64
    log = _log(tmp_path / "a")
    assert log["step"] == list(range(1, 25)) and log["fvu"][-1] < 0.8 * log["fvu"][0]  # it learns
    checkpoint = torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["source"]["stream"]["seed"] == 5 and checkpoint["source"]["stream"]["buffer_rows"] == 4 * BATCH


class _Killed(Exception):
    pass


def _kill_after(calls_left: int):
    calls = [0]

    def progress(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        calls[0] += 1
        if calls[0] == calls_left:
            raise _Killed

    return progress


def test_a_killed_streamed_run_resumes_bitwise_identical(hooked: HookedModel, corpus: TokenizedCorpus, tmp_path: Path) -> None:
    first, second = _config(A, checkpoint_every=6), _config(B, arch="batchtopk", seed=3, checkpoint_every=6)
    whole = train_saes_from_model([first, second], hooked, corpus, [tmp_path / "w1", tmp_path / "w2"], stream=STREAM, seed=0,
                                  device="cpu")
    with pytest.raises(_Killed):  # killed after step 19: the last checkpoint is step 18
        train_saes_from_model([first], hooked, corpus, [tmp_path / "c1"], stream=STREAM, seed=0, device="cpu",
                              progress=_kill_after(19))
    assert torch.load(tmp_path / "c1" / CHECKPOINT_FILE, weights_only=True)["step"] == 18
    # resumed together with a fresh run: the first replays 18 steps of the stream, the second starts at 0
    tasks: list[str] = []
    resumed = train_saes_from_model([first, second], hooked, corpus, [tmp_path / "c1", tmp_path / "c2"], stream=STREAM,
                                    seed=0, device="cpu", progress=lambda task, advance=0, total=None, **f: tasks.append(task))
    for one, other, a_dir, b_dir in zip(whole, resumed, ("w1", "w2"), ("c1", "c2")):
        _assert_same(one, other)
        assert _log(tmp_path / a_dir) == _log(tmp_path / b_dir)
    assert tasks.count(f"train sae 1/2 {A}") == 1 + 6 and tasks.count(f"train sae 2/2 {B}") == 24 and REPLAY_TASK not in tasks
    # alone, the resumed run replays the stream without training
    with pytest.raises(_Killed):
        train_saes_from_model([first], hooked, corpus, [tmp_path / "c3"], stream=STREAM, device="cpu", progress=_kill_after(8))
    tasks.clear()
    _assert_same(whole[0], train_saes_from_model([first], hooked, corpus, [tmp_path / "c3"], stream=STREAM, device="cpu",
                                                 progress=lambda task, advance=0, total=None, **f: tasks.append(task))[0])
    assert tasks == ["train sae"] + [REPLAY_TASK] * 6 + ["train sae"] * 18
    # another stream is other data: refused
    with pytest.raises(LmscopeError, match="other data"):
        train_saes_from_model([first], hooked, corpus, [tmp_path / "c1"], stream=STREAM, seed=9, device="cpu")


def test_bad_input_is_one_clear_sentence(hooked: HookedModel, corpus: TokenizedCorpus, tmp_path: Path) -> None:
    dirs = [tmp_path / "1", tmp_path / "2"]
    refusals = [
        (lambda: train_saes_from_model([_config(A), _config(B, batch_size=16)], hooked, corpus, dirs, stream=STREAM),
         rf"disagree on batch_size \(32 for {A}, 16 for {B}\)"),
        (lambda: train_saes_from_model([_config(A), _config(B, total_tokens=BATCH * 10)], hooked, corpus, dirs, stream=STREAM),
         r"disagree on steps \(total_tokens // batch_size\) \(24 for .*, 10 for"),
        (lambda: train_saes_from_model([_config(A), _config(B, seed=1)], hooked, corpus, dirs, stream=STREAM),
         "disagree on seed .*; the stream shuffles with one seed, so make them equal or pass the stream's seed"),
        (lambda: train_saes_from_model([_config(A, total_tokens=None)], hooked, corpus, dirs[:1], stream=STREAM),
         "has no total_tokens; a model stream has no epochs"),
        (lambda: train_saes_from_model([_config(A), _config(B)], hooked, corpus, [dirs[0], dirs[0]], stream=STREAM),
         "share an out_dir"),
        (lambda: train_saes_from_model([_config("blocks.7.hook_resid_post")], hooked, corpus, dirs[:1], stream=STREAM),
         "unknown hook 'blocks.7.hook_resid_post'; valid hooks are"),
        (lambda: train_saes_from_model([_config(A)], hooked, corpus, dirs[:1], stream=StreamConfig(ctx=CTX, buffer_rows=BATCH)),
         "buffer_rows=32 is less than two batches of 32"),
        (lambda: ActivationStream(hooked, corpus, ["blocks.0.attn.hook_pattern"], STREAM, batch_size=BATCH), "attention pattern"),
        (lambda: ActivationStream(hooked, corpus, [A], StreamConfig(ctx=100), batch_size=BATCH), "longer than the model's 64"),
        (lambda: next(iter(ActivationStream(hooked, corpus, [A], StreamConfig(ctx=CTX, domain="nope"), batch_size=BATCH))),
         "domain 'nope' is not in"),
    ]
    for make, message in refusals:
        with pytest.raises(LmscopeError, match=message):
            make()
    assert not any(d.exists() for d in dirs)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmscope.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_streams_two_hooks_end_to_end(workspace: dict[str, Path], hooked: HookedModel, corpus: TokenizedCorpus,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", str(workspace["model"]), "--corpus", str(workspace["corpus"]), "--ctx", str(CTX), "--tokens", "400",
              "--batch-size", str(BATCH), "--width", "64", "--k", "4", "--device", "cpu"]
    out = tmp_path / "run"
    result = _cli("sae", "train", *common, "--hook", A, "--hook", B, "--stream", "--buffer-rows", "128", "--epochs", "2",
                  "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["saes"]) == {A, B}
    for hook, d in ((A, 32), (B, 64)):
        entry = summary["saes"][hook]
        assert entry["sae"] == str(out / hook / "sae") and entry["store"] is None
        assert entry["training"]["step"] == 2 * 400 // BATCH and entry["spliced"]["ce_clean"] > 0
        sae, _ = load_sae(out / hook / "sae")
        assert sae.shape.hook == hook and sae.shape.d_in == d and sae.shape.width == 64
    assert not (out / "activations").exists()
    # the command trained what the library trains with the same settings
    configs = [SaeTrainConfig(hook=h, width=64, k=4, batch_size=BATCH, epochs=2, total_tokens=800) for h in (A, B)]
    saes = train_saes_from_model(configs, hooked, corpus, [tmp_path / "lib_a", tmp_path / "lib_b"],
                                 stream=StreamConfig(ctx=CTX, buffer_rows=128, n_tokens=400), device="cpu")
    for sae, hook in zip(saes, (A, B)):
        trained = torch.load(out / hook / "train" / CHECKPOINT_FILE, weights_only=True)["sae"]
        library = torch.load(tmp_path / f"lib_{'a' if hook == A else 'b'}" / CHECKPOINT_FILE, weights_only=True)["sae"]
        assert all(torch.equal(trained[name], library[name]) for name in library), hook

    # bad input: one sentence, exit 2 (in this process: the entry point as the console script runs it)
    for args, message in [(["--hook", A, "--hook", "blocks.9.hook_mlp_out", "--stream"], "unknown hook 'blocks.9.hook_mlp_out'"),
                          (["--hook", A, "--hook", B, "--out-hook", B], "--out-hook pairs with one --hook"),
                          (["--hook", A, "--buffer-rows", "64"], "--buffer-rows sets up the model stream; add --stream")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["sae", "train", *common, *args, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and message in " ".join(capsys.readouterr().err.split()), args
    assert not (tmp_path / "bad").exists()


def test_cli_without_stream_captures_every_hook_into_one_store(workspace: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, second = tmp_path / "run", "blocks.1.hook_resid_post"  # (features of an mlp.hook_post SAE fail in run_sae_job)
    with pytest.raises(SystemExit) as exit_info:
        main(["sae", "train", "--model", str(workspace["model"]), "--corpus", str(workspace["corpus"]), "--ctx", str(CTX),
              "--tokens", "300", "--batch-size", str(BATCH), "--width", "64", "--k", "4", "--device", "cpu",
              "--hook", A, "--hook", second, "--out", str(out), "--json"])
    assert exit_info.value.code in (0, None)
    summary = json.loads(capsys.readouterr().out)
    store = ActivationStore.open(out / "activations")
    assert sorted(store.hooks) == sorted([A, second]) and store.n_rows == 300
    for hook in (A, second):
        entry = summary["saes"][hook]
        assert entry["store"] == str(out / "activations") and entry["reconstruction"]["rows"] > 0
        assert load_sae(out / hook / "sae")[0].shape.hook == hook and not (out / hook / "activations").exists()
