"""The LDS harness checked against independent truth: rank correlation by counting, a plain training loop, the suite's own checkpoints.

One tiny suite (real text: functions of two standard-library packages; hidden 16, one layer, 24 updates
of 4 rows × 32 tokens) is trained once for the module; the harness retrains the first 12 updates of it.
"""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from lmscope.data.megatron import MegatronDataset
from lmscope.errors import LmscopeError
from lmscope.influence.job import Query
from lmscope.influence.lds import (
    LdsSettings,
    heldout_queries,
    lds_of,
    open_run,
    run_lds,
    spearman,
    subset_masks,
    suite_tokenizer,
    train_run,
)
from lmscope.suites.train import train_suite
from lmscope.suites.train_config import ModelSize, SuiteTrainConfig

STEPS = 24  # the suite's run
N_STEPS = 12  # the LDS's shortened run (a checkpoint of the suite)
BATCH = 4
SEQ = 32


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


def _documents(path: Path, per_domain_bytes: int = 12_000, max_doc_chars: int = 1500) -> Path:
    """Real text: top-level definitions of the stdlib's json and email packages, one document each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for package in ("json", "email"):
        used = 0
        for source in sorted((stdlib / package).rglob("*.py")):
            for number, block in enumerate(re.split(r"\n(?=(?:def|class) )", source.read_text(encoding="utf-8"))):
                block = block[:max_doc_chars]
                if block.strip() and used < per_domain_bytes:
                    records.append({"id": f"{source.name}#{number}", "domain": package, "text": block})
                    used += len(block)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    root = tmp_path_factory.mktemp("lds-suite")
    config = SuiteTrainConfig(
        name="lds-test", corpus=str(_documents(root / "docs.jsonl")), heldout_fraction=0.1, vocab_size=300, seq_len=SEQ,
        batch_size=BATCH, steps=STEPS, sizes=[ModelSize(label="s", hidden_size=16, num_layers=1, heads=2, lr=1e-2)],
        even_checkpoints=4, resume_every=16, eval_tokens=512,
    )
    train_suite(config, root / "suite", device="cpu")
    assert N_STEPS in json.loads((root / "suite" / "suite.json").read_text())["checkpoint_steps"]
    return root / "suite"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _row_queries(suite: Path) -> list[tuple[list[int], list[int]]]:
    """Planted signal: each query is a piece of one training row of the shortened run, so that row's own inclusion moves its loss."""
    rows = MegatronDataset(suite / "data" / "train")
    n = N_STEPS * BATCH
    return [(rows[r][:16].astype(int).tolist(), rows[r][16:24].astype(int).tolist()) for r in (n - 1, n - 3, n - 6, n - 10, n // 2, n // 3)]


# --- the maths --------------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1…n, ties at the mean of the ranks they span, by counting (the test's own truth)."""
    return np.array([np.sum(values < v) + (np.sum(values == v) + 1) / 2 for v in values])


def test_spearman_is_the_pearson_correlation_of_average_ranks() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        x = rng.normal(size=n) if trial % 2 else rng.integers(0, 4, size=n).astype(float)  # every other trial: many ties
        y = x * rng.normal() + rng.normal(size=n) if trial % 3 else rng.integers(0, 3, size=n).astype(float)
        rx, ry = _average_ranks(x) - _average_ranks(x).mean(), _average_ranks(y) - _average_ranks(y).mean()
        denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
        if denominator == 0:
            assert math.isnan(spearman(x, y))
        else:
            assert spearman(x, y) == pytest.approx(float(rx @ ry) / denominator, abs=1e-12)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))  # a constant side has no ranking
    assert spearman(np.arange(6.0), -np.arange(6.0) ** 3) == pytest.approx(-1.0)


def test_subsets_are_exactly_the_fraction_seeded_and_reproducible() -> None:
    masks = subset_masks(100, 6, 0.5, seed=3)
    assert masks.shape == (6, 100) and masks.dtype == bool
    assert (masks.sum(axis=1) == 50).all()
    assert np.array_equal(masks, subset_masks(100, 6, 0.5, seed=3))
    assert np.array_equal(masks[:4], subset_masks(100, 4, 0.5, seed=3))  # subset j depends on (seed, j) only
    assert not np.array_equal(masks, subset_masks(100, 6, 0.5, seed=4))
    assert len({m.tobytes() for m in masks}) == 6
    assert (subset_masks(51, 3, 0.3, seed=0).sum(axis=1) == round(0.3 * 51)).all()
    # uniform: every row is kept about half the time
    frequency = subset_masks(40, 2000, 0.5, seed=1).mean(axis=0)
    assert np.abs(frequency - 0.5).max() < 0.06


def test_lds_correlates_predicted_log_probability_with_minus_the_loss() -> None:
    rng = np.random.default_rng(0)
    masks = subset_masks(30, 12, 0.5, seed=0)
    scores = rng.normal(size=(2, 30))
    predicted = masks.astype(float) @ scores.T  # Σ_{n∈S_j} τ: predicted log p(c|p), up to a constant
    losses = -(predicted + 0.01 * rng.normal(size=predicted.shape))  # the loss falls where the log-prob rises
    values = lds_of(scores, masks, losses)
    assert (values > 0.9).all()
    for q in range(2):
        assert values[q] == pytest.approx(scipy.stats.spearmanr(predicted[:, q], -losses[:, q]).statistic, abs=1e-12)


# --- retraining -------------------------------------------------------------------------------------


def test_full_run_reproduces_the_suites_checkpoint_bitwise(suite: Path) -> None:
    run = open_run(suite, "s", N_STEPS)
    ours = _state(train_run(run))
    stored = GPTNeoXForCausalLM.from_pretrained(str(suite / "s" / "checkpoints" / f"step{N_STEPS}"), dtype=torch.float32).state_dict()
    assert set(ours) == set(stored)
    for name, value in stored.items():
        assert torch.equal(ours[name], value), name
    initial = GPTNeoXForCausalLM.from_pretrained(str(suite / "s" / "checkpoints" / "step0"), dtype=torch.float32).state_dict()
    assert not torch.equal(ours["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], initial["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"])


def _plain_training(suite: Path, keep: np.ndarray) -> torch.nn.Module:
    """The subset's training written out: AdamW on (1/B)·Σ_{kept rows} mean row loss, the schedule's formula, clipping at 1."""
    model = GPTNeoXForCausalLM.from_pretrained(str(suite / "s" / "checkpoints" / "step0"), dtype=torch.float32)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    rows = MegatronDataset(suite / "data" / "train")
    peak, warmup = 1e-2, max(1, round(0.05 * STEPS))
    for update in range(1, N_STEPS + 1):
        if update <= warmup:
            lr = peak * update / warmup
        else:
            lr = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (STEPS - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for r in range((update - 1) * BATCH, update * BATCH):
            if keep[r]:
                tokens = torch.as_tensor(rows[r].astype(np.int64))[None]
                logits = model(input_ids=tokens[:, :-1]).logits[0]
                (F.cross_entropy(logits.float(), tokens[0, 1:]) / BATCH).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
    return model.eval()


def test_subset_retraining_equals_a_plain_loop_on_the_kept_rows(suite: Path) -> None:
    run = open_run(suite, None, N_STEPS)
    keep = subset_masks(N_STEPS * BATCH, 1, 0.5, seed=7)[0]
    keep[0:BATCH] = False  # update 1 loses its whole batch: a zero-gradient step
    keep[BATCH : 2 * BATCH] = True  # update 2 keeps all of it
    ours_model, truth_model = train_run(run, keep), _plain_training(suite, keep)
    ours, truth = _state(ours_model), _state(truth_model)
    # The attention's key bias has exactly zero gradient (softmax ignores a shift shared by every key), so
    # its computed gradient is rounding noise that Adam scales up to ±lr: it is compared through the
    # model's outputs, which it cannot move. Every other weight agrees to 1e-5 (Adam divides each update by a
    # running gradient norm, so summation-order rounding of 1e-7 in a small gradient can reach ~1e-6 in a weight).
    name = "gpt_neox.layers.0.attention.query_key_value.bias"
    for state in (ours, truth):
        state[name] = state[name].view(2, 3, -1)[:, [0, 2]].clone()  # [heads, (q, k, v), head_dim] without k
    worst = max(float((ours[k] - truth[k]).abs().max()) for k in truth)
    assert worst < 1e-5, worst
    rows = torch.as_tensor(run.row_tokens()[:8, :-1])
    with torch.no_grad():
        gap = (ours_model(input_ids=rows).logits - truth_model(input_ids=rows).logits).abs().max()
    assert float(gap) < 1e-5, float(gap)
    full = _state(train_run(run))
    assert max(float((_state(ours_model)[k] - full[k]).abs().max()) for k in full) > 1e-3  # leaving rows out did change the model


# --- end to end -------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_end_to_end_lds_is_positive_on_a_planted_signal_and_resumes_identically(suite: Path, tmp_path: Path) -> None:
    queries = _row_queries(suite)
    settings = LdsSettings(n_steps=N_STEPS, n_subsets=16, seed=0)
    whole = run_lds(suite, queries, settings, tmp_path / "whole")

    assert whole["size"] == "s" and whole["rows"] == N_STEPS * BATCH and whole["subsets"]["rows_kept"] == N_STEPS * BATCH // 2
    assert whole["full_run"]["bitwise_equal"] is True
    for method in ("identity", "diagonal", "kfac", "ekfac"):
        values = whole["methods"][method]["per_query"]
        assert len(values) == len(queries) and all(v is not None and -1 <= v <= 1 for v in values), (method, values)
    # Planted signal: a query cut from a training row is moved most by that row. Measured here with subset
    # seeds 0-3 (16 subsets, 6 queries): identity 0.36/0.18/0.21/0.11, EK-FAC 0.44/0.29/0.34/0.32 — single
    # queries range from -0.3 to 0.8, so only the means are asserted, with margin to spare.
    assert whole["methods"]["identity"]["mean_lds"] > 0.0, whole["methods"]["identity"]
    assert whole["methods"]["ekfac"]["mean_lds"] > 0.15, whole["methods"]["ekfac"]

    # the files agree with an independent recomputation through scipy
    masks = subset_masks(N_STEPS * BATCH, 16, 0.5, seed=0)
    measured = np.asarray(whole["measurements"])
    scores = np.load(tmp_path / "whole" / "scores" / "ekfac.npy")
    assert scores.shape == (len(queries), N_STEPS * BATCH)
    for q in range(len(queries)):
        expected = scipy.stats.spearmanr(masks @ scores[q], -measured[:, q]).statistic
        assert whole["methods"]["ekfac"]["per_query"][q] == pytest.approx(expected, abs=1e-12)
    table = pq.read_table(tmp_path / "whole" / "lds.parquet").to_pylist()
    assert len(table) == 4 * len(queries) and {r["method"] for r in table} == {"identity", "diagonal", "kfac", "ekfac"}
    assert json.loads((tmp_path / "whole" / "lds.json").read_text())["methods"] == whole["methods"]
    assert (tmp_path / "whole" / "lds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # killed in the middle of subset 5: the rerun keeps subsets 0-4 and ends with the same numbers
    def kill(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        if task == "lds: retrain" and advance == 1:
            kill.updates += 1
            if kill.updates == 5 * N_STEPS + 3:
                raise _Killed

    kill.updates = 0
    with pytest.raises(_Killed):
        run_lds(suite, queries, settings, tmp_path / "killed", progress=kill)
    done = sorted(p.name for p in (tmp_path / "killed" / "measurements").glob("subset*.json"))
    assert done == [f"subset{j:04d}.json" for j in range(5)]
    kept = (tmp_path / "killed" / "measurements" / "subset0000.json").stat().st_mtime_ns
    resumed = run_lds(suite, queries, settings, tmp_path / "killed")
    assert (tmp_path / "killed" / "measurements" / "subset0000.json").stat().st_mtime_ns == kept  # not retrained
    def numbers(result: dict) -> dict:
        return {m: (v["mean_lds"], v["per_query"]) for m, v in result["methods"].items()}

    assert numbers(resumed) == numbers(whole) and resumed["measurements"] == whole["measurements"]

    with pytest.raises(LmscopeError, match="another LDS run .its settings differ"):
        run_lds(suite, queries, LdsSettings(n_steps=N_STEPS, n_subsets=16, seed=1), tmp_path / "whole")


def test_queries_from_text_and_heldout_documents(suite: Path) -> None:
    pairs = heldout_queries(suite, 3, prompt_tokens=12, completion_tokens=6)
    assert len(pairs) == 3 and all(len(p) == 13 and p[0] == 0 and len(c) == 6 for p, c in pairs)
    from lmscope.data.tokenized import TokenizedCorpus

    corpus = TokenizedCorpus.open(suite / "corpus")
    heldout = {tuple(corpus.document_tokens(d)[:18].tolist()) for d in corpus.select(split="heldout")}
    assert all(tuple(p[1:] + c) in heldout for p, c in pairs)
    tokenizer = suite_tokenizer(suite)
    from lmscope.influence.lds import _token_queries

    encoded, texts = _token_queries(open_run(suite, None, N_STEPS), [Query("def loads(", "s, cls=None")])
    assert encoded[0][0] + encoded[0][1] == tokenizer.encode_batch(["def loads(s, cls=None"])[0]
    assert texts == [{"prompt": "def loads(", "completion": "s, cls=None"}]


def test_bad_input_is_refused(suite: Path, tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="method 'tracin' is unknown"):
        LdsSettings(methods=("identity", "tracin"))
    with pytest.raises(LmscopeError, match="n-subsets 1 must be"):
        LdsSettings(n_subsets=1)
    for fraction in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(LmscopeError, match="fraction"):
            LdsSettings(fraction=fraction)
    with pytest.raises(LmscopeError, match="damping"):
        LdsSettings(damping="lots")
    queries = _row_queries(suite)[:1]
    with pytest.raises(LmscopeError, match="size 'xl' is not in the suite"):
        run_lds(suite, queries, LdsSettings(size="xl", n_steps=2), tmp_path / "a")
    with pytest.raises(LmscopeError, match="exceeds the suite's 24 updates"):
        run_lds(suite, queries, LdsSettings(n_steps=25), tmp_path / "b")
    with pytest.raises(LmscopeError, match="outside the vocabulary"):
        run_lds(suite, [([1, 2], [5000])], LdsSettings(n_steps=2), tmp_path / "c")
    with pytest.raises(LmscopeError, match="not a mini suite"):
        run_lds(tmp_path, queries, LdsSettings(n_steps=2), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before anything was written


def test_cli_runs_and_refuses_bad_input(suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmscope.cli import main

    with pytest.raises(SystemExit) as info:
        main(["influence", "lds", str(suite), "--out", str(tmp_path / "l"), "--steps", str(N_STEPS), "--subsets", "3",
              "--methods", "identity", "--heldout-queries", "2", "--prompt-tokens", "8", "--completion-tokens", "4", "--json"])
    assert info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert list(result["methods"]) == ["identity"] and len(result["queries"]) == 2 and result["subsets"]["n"] == 3
    assert len(result["measurements"]) == 3 and (tmp_path / "l" / "lds.png").is_file()
    with pytest.raises(SystemExit) as info:
        main(["influence", "lds", str(suite), "--out", str(tmp_path / "m"), "--methods", "identity,tracin"])
    assert info.value.code == 2 and "tracin" in capsys.readouterr().err
