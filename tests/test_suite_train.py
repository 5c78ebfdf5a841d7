"""Training a mini suite, end to end on a shortened run, checked against independent truths.

The corpus is real text that every Python installation has: chunks of the standard
library's source (four packages, four domains). One module-scoped suite of three tiny
sizes is trained once; the other tests read it, or train a one-size variant of it and
compare bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lmscope.cli import main
from lmscope.data.megatron import MegatronDataset
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.suites.data_order import batch_sha256, permutation, training_permutation
from lmscope.suites.learning_check import evaluation_documents, heldout_bits_per_byte, unigram_bits_per_byte
from lmscope.suites.schedule import checkpoint_steps, learning_rate
from lmscope.suites.train import LOG_SCHEMA, train_suite
from lmscope.suites.train_config import SuiteTrainConfig, config_to_toml, load_train_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 160
BATCH = 8
SEQ = 64
SIZES = """
[[sizes]]
label = "s16"
hidden_size = 16
num_layers = 1
heads = 2

[[sizes]]
label = "s32"
hidden_size = 32
num_layers = 2
heads = 2

[[sizes]]
label = "s64"
hidden_size = 64
num_layers = 2
heads = 4
"""


def stdlib_documents(path: Path, per_domain_bytes: int = 150_000, max_doc_chars: int = 3000) -> Path:
    """Four domains of real text: top-level definitions of the stdlib's asyncio, email, unittest and xml packages, grouped into documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for package in ("asyncio", "email", "unittest", "xml"):
        used = 0
        for source in sorted((stdlib / package).rglob("*.py")):
            blocks = re.split(r"\n(?=(?:def|class|async def) )", source.read_text(encoding="utf-8", errors="replace"))
            document, number = "", 0
            for block in blocks + [None]:
                if block is None or (document and len(document) + len(block) > max_doc_chars):
                    if document.strip() and used < per_domain_bytes:
                        records.append({"id": f"{source.relative_to(stdlib)}#{number}", "domain": package, "text": document})
                        used += len(document.encode("utf-8"))
                        number += 1
                    document = ""
                if block is not None:
                    document += block + "\n"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_config(path: Path, documents: Path, sizes: str = SIZES, **changes: object) -> Path:
    values = {
        "name": "test", "corpus": str(documents), "heldout_fraction": 0.1, "vocab_size": 512, "seq_len": SEQ,
        "batch_size": BATCH, "steps": STEPS, "lr": 1e-2, "resume_every": 16, "eval_tokens": 8192, **changes,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n" + sizes, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("suite-train")
    documents = stdlib_documents(root / "docs.jsonl")
    config_path = write_config(root / "suite.toml", documents)
    reports: list[tuple] = []
    summary = train_suite(load_train_config(config_path), root / "suite", device="cpu",
                          progress=lambda task, advance=0, total=None, **fields: reports.append((task, advance, total, fields)))
    return {"root": root, "documents": documents, "config": config_path, "suite": root / "suite", "summary": summary, "reports": reports}


def _safetensors(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


# --- learning ------------------------------------------------------------------------------


def test_every_size_learns_and_larger_sizes_end_lower(trained: dict) -> None:
    summary = trained["summary"]
    unigram = summary["unigram_bits_per_byte"]
    bpb = {model["size"]: model["heldout_bits_per_byte"] for model in summary["models"]}
    assert set(bpb) == {"s16", "s32", "s64"}
    for size, value in bpb.items():
        assert value < unigram - 0.4, (size, value, unigram)
    assert bpb["s64"] < bpb["s32"] - 0.03 < bpb["s16"] - 0.06, bpb
    check = json.loads((trained["suite"] / "learning_check.json").read_text())
    assert check["unigram"]["tokens"] == check["models"]["s16"]["tokens"]  # the same tokens scored
    assert check["unigram"]["bytes"] == check["models"]["s64"]["bytes"]
    # the progress callback saw every update of every size, with a live loss
    updates = [r for r in trained["reports"] if r[0] == "train s32" and r[1] == 1]
    assert len(updates) == STEPS and "loss" in updates[-1][3]


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_schedule_and_suite_metadata(trained: dict) -> None:
    suite = trained["suite"]
    expected = [0, 1, 2, 4, 8, *range(10, STEPS + 1, 10)]  # log-spaced below the first of 16 even steps
    assert checkpoint_steps(STEPS, 16) == expected
    meta = json.loads((suite / "suite.json").read_text())
    assert meta["format"] == "lmscope-mini-suite" and meta["format_version"] == 1 and meta["status"] == "complete"
    assert meta["checkpoint_steps"] == expected
    assert meta["tokens_per_step"] == BATCH * SEQ and meta["batch_size"] == BATCH and meta["seq_len"] == SEQ
    assert meta["models"] == {"s16": {"size": "s16", "seed": 0}, "s32": {"size": "s32", "seed": 0}, "s64": {"size": "s64", "seed": 0}}
    assert meta["row_of_step"].startswith("rows [batch_size*(n-1), batch_size*n) are consumed by optimizer update n")
    for label in ("s16", "s32", "s64"):
        present = sorted(int(p.name[4:]) for p in (suite / label / "checkpoints").iterdir())
        assert present == expected
        assert json.loads((suite / label / "suite.json").read_text()) == {"size": label, "seed": 0, "tokens_per_step": BATCH * SEQ}
        assert not (suite / label / "resume").exists()  # resume state is removed once a model is done
    step = suite / "s32" / "checkpoints" / "step10"
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json"} <= {p.name for p in step.iterdir()}
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["tokens_seen"] == 10 * BATCH * SEQ
    from lmscope.fsio import sha256_file

    assert state["weights_sha256"] == sha256_file(step / "model.safetensors")
    saved = torch.load(step / "optimizer.pt", weights_only=True)
    assert saved["step"] == 10 and saved["scheduler"]["last_epoch"] == 10 and saved["optimizer"]["state"]


def test_checkpoints_load_by_spec_and_step0_is_the_seeded_init(trained: dict) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lmscope.models.loading import load_model

    suite = trained["suite"]
    meta = json.loads((suite / "suite.json").read_text())
    final = load_model(f"{suite}/s64@step{STEPS}", device="cpu")
    assert final.tokenizer is not None and final.model.config.model_type == "gpt_neox"
    assert final.model.config.use_parallel_residual and final.model.config.max_position_embeddings == SEQ
    assert sum(p.numel() for p in final.model.parameters()) == meta["sizes"]["s64"]["params"]
    # independent construction: seed, then the plain transformers constructor
    loaded = load_model(f"{suite}/s16@step0", device="cpu").model
    config = GPTNeoXConfig.from_pretrained(suite / "s16" / "checkpoints" / "step0")
    torch.manual_seed(0)
    fresh = GPTNeoXForCausalLM(config)
    for (name, a), (_, b) in zip(sorted(fresh.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name


def test_suites_checkpoints_lists_each_size(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    suite = trained["suite"]
    with pytest.raises(SystemExit) as exit_info:
        main(["suites", "checkpoints", f"{suite}/s32", "--json"])
    assert exit_info.value.code in (0, None)
    rows = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in rows] == checkpoint_steps(STEPS, 16)
    assert all(row["tokens_seen"] == row["step"] * BATCH * SEQ and row["revision"] == f"step{row['step']}" for row in rows)
    from lmscope.suites.audit import audit_checkpoints
    from lmscope.suites.catalog import local_suite

    whole = local_suite(suite)  # all sizes share the schedule, so the suite lists them too
    assert [m.size for m in whole.models] == ["s16", "s32", "s64"] and whole.tokens_per_step == BATCH * SEQ
    assert {row.status for row in audit_checkpoints(f"{suite}/s16")} == {"ok"}


# --- data order ----------------------------------------------------------------------------


def test_rows_and_segments_reconstruct_the_corpus(trained: dict) -> None:
    suite = trained["suite"]
    corpus = TokenizedCorpus.open(suite / "corpus")
    rows = MegatronDataset(suite / "data" / "train")
    order = json.loads((suite / "data" / "order.json").read_text())
    eos = json.loads((suite / "suite.json").read_text())["tokenizer"]["eos_token_id"]
    assert len(rows) == STEPS * BATCH and set(rows.sizes.tolist()) == {SEQ + 1}
    assert len(order["permutation"]) == STEPS * BATCH and order["data_seed"] == 1234
    segments = pq.read_table(suite / "data" / "segments.parquet")
    assert [(f.name, str(f.type)) for f in segments.schema] == [
        ("row", "int64"), ("row_offset", "int32"), ("length", "int32"), ("doc_index", "int64"), ("doc_offset", "int64")]
    covered = np.zeros((len(rows), SEQ + 1), dtype=bool)
    seen: dict[int, np.ndarray] = {}
    splits = corpus.documents.column("split").to_pylist()
    for row, offset, length, doc, doc_offset in zip(*(segments.column(n).to_pylist() for n in segments.column_names)):
        assert splits[doc] == "train"
        expected = corpus.document_tokens(doc)[doc_offset : doc_offset + length]
        assert np.array_equal(rows[row][offset : offset + length], expected)
        assert not covered[row, offset : offset + length].any()
        covered[row, offset : offset + length] = True
        # within one epoch every document token is a target at most once; the row-overlap token is shared by two rows
        counts = seen.setdefault(doc, np.zeros(len(corpus.document_tokens(doc)), dtype=np.int8))
        counts[doc_offset + (1 if offset == 0 else 0) : doc_offset + length] += 1
    assert max(int(c.max()) for c in seen.values()) == 1
    uncovered = np.stack([rows[r] for r in range(len(rows))])[~covered]
    assert uncovered.size and np.all(uncovered == eos)  # everything else is a document separator


def test_update_n_consumed_rows_of_batch_n(trained: dict) -> None:
    suite = trained["suite"]
    rows = MegatronDataset(suite / "data" / "train")
    log = pq.read_table(suite / "s32" / "train_log.parquet")
    assert log.schema.names == LOG_SCHEMA.names and log.num_rows == STEPS
    table = log.to_pydict()
    assert table["step"] == list(range(1, STEPS + 1))
    assert table["tokens_seen"] == [n * BATCH * SEQ for n in range(1, STEPS + 1)]
    assert set(table["size"]) == {"s32"} and set(table["seed"]) == {0}
    for n in range(1, STEPS + 1):
        batch = np.stack([rows[r] for r in range(BATCH * (n - 1), BATCH * n)])
        assert table["batch_sha256"][n - 1] == batch_sha256(batch), n
    assert table["lr"][-1] == pytest.approx(0.1 * 1e-2) and max(table["lr"]) == pytest.approx(1e-2)
    # independent truth: the loss logged for update n is checkpoint step(n-1)'s loss on rows [B(n-1), Bn)
    from transformers import GPTNeoXForCausalLM

    for n in (1, 2, 11):
        model = GPTNeoXForCausalLM.from_pretrained(suite / "s32" / "checkpoints" / f"step{n - 1}").train()
        batch = torch.from_numpy(np.stack([rows[r] for r in range(BATCH * (n - 1), BATCH * n)]).astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        assert float(loss) == pytest.approx(table["loss"][n - 1], rel=1e-5), n


def test_replay_reads_the_suite(trained: dict) -> None:
    from lmscope.suites.replay.mini import MiniSuiteSource

    source = MiniSuiteSource(trained["suite"])
    rows = MegatronDataset(trained["suite"] / "data" / "train")
    assert source.num_steps == STEPS
    batch = source.step(3)
    assert np.array_equal(batch.tokens, np.stack([rows[r] for r in range(3 * BATCH, 4 * BATCH)]))


def test_training_permutation_covers_each_epoch_once() -> None:
    order = training_permutation(5, 12, data_seed=7)
    assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order[5:10].tolist()) == list(range(5))
    assert np.array_equal(permutation(50, 7, "rows"), permutation(50, 7, "rows"))
    assert not np.array_equal(permutation(50, 7, "rows"), permutation(50, 8, "rows"))


# --- logs and plot ---------------------------------------------------------------------------


def test_training_log_and_plot(trained: dict) -> None:
    suite = trained["suite"]
    for label in ("s16", "s32", "s64"):
        table = pq.read_table(suite / label / "train_log.parquet")
        assert table.column_names == ["step", "tokens_seen", "loss", "lr", "grad_norm", "seconds", "size", "seed", "batch_sha256"]
        assert table.num_rows == STEPS
    assert (suite / "train_log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- determinism and resumption ----------------------------------------------------------------

ONE_SIZE = SIZES.split("[[sizes]]")


def _one_size(label: str) -> str:
    return "[[sizes]]" + next(block for block in ONE_SIZE if f'"{label}"' in block)


def test_training_is_bitwise_deterministic(trained: dict, tmp_path: Path) -> None:
    # the same size, seed, data and hyperparameters in a second, independent suite: every checkpoint identical
    config = load_train_config(write_config(tmp_path / "one.toml", trained["documents"], sizes=_one_size("s16")))
    train_suite(config, tmp_path / "again", device="cpu")
    for step in checkpoint_steps(STEPS, 16):
        a = trained["suite"] / "s16" / "checkpoints" / f"step{step}"
        b = tmp_path / "again" / "s16" / "checkpoints" / f"step{step}"
        assert _safetensors(a) == _safetensors(b), step
    first = torch.load(trained["suite"] / "s16" / "checkpoints" / f"step{STEPS}" / "optimizer.pt", weights_only=True)
    second = torch.load(tmp_path / "again" / "s16" / "checkpoints" / f"step{STEPS}" / "optimizer.pt", weights_only=True)
    for key, state in first["optimizer"]["state"].items():
        assert all(torch.equal(state[name], second["optimizer"]["state"][key][name]) for name in state)
    assert (trained["suite"] / "data" / "train.bin").read_bytes() == (tmp_path / "again" / "data" / "train.bin").read_bytes()


def test_killed_and_rerun_ends_bitwise_identical(trained: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "one.toml", trained["documents"], sizes=_one_size("s64"))
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "lmscope.cli", "suite", "train", str(config), "--out", str(out), "--device", "cpu", "--json"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    resume = out / "s64" / "resume"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if resume.is_dir() and any(int(p.name[4:]) >= 32 for p in resume.glob("step*")):
                break
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out / "s64" / "train_log.parquet").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "s64" / "checkpoints").iterdir()}
    assert "step20" in done_before and f"step{STEPS}" not in done_before
    with pytest.raises(SystemExit) as exit_info:
        main(["suite", "train", str(config), "--out", str(out), "--device", "cpu", "--json"])
    assert exit_info.value.code in (0, None)
    for step in checkpoint_steps(STEPS, 16):
        a = trained["suite"] / "s64" / "checkpoints" / f"step{step}"
        b = out / "s64" / "checkpoints" / f"step{step}"
        assert _safetensors(a) == _safetensors(b), step
        if b.name in done_before:  # resumed, not restarted: finished checkpoints were left alone
            assert b.stat().st_mtime_ns == done_before[b.name]
    assert not [p for p in (out / "s64" / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers
    log_a = pq.read_table(trained["suite"] / "s64" / "train_log.parquet").to_pydict()
    log_b = pq.read_table(out / "s64" / "train_log.parquet").to_pydict()
    assert log_a["loss"] == log_b["loss"] and log_a["batch_sha256"] == log_b["batch_sha256"]


# --- the learning check itself ------------------------------------------------------------------


class _Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over ``vocab`` ids."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"eos_token_id": 0, "max_position_embeddings": 16})()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> object:
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_bits_per_byte_against_closed_forms(trained: dict) -> None:
    corpus = TokenizedCorpus.open(trained["suite"] / "corpus")
    documents = evaluation_documents(corpus, 3000)
    tokens = int(corpus.documents.column("n_tokens").to_numpy()[documents].sum())
    n_bytes = int(corpus.documents.column("n_bytes").to_numpy()[documents].sum())
    assert tokens >= 3000 and len(set(corpus.documents.column("domain").to_numpy(zero_copy_only=False)[documents])) == 4
    uniform = heldout_bits_per_byte(_Uniform(512), corpus, 3000, ctx=16)
    assert uniform.tokens == tokens and uniform.bytes == n_bytes
    assert uniform.bits_per_byte == pytest.approx(tokens * np.log2(512) / n_bytes, rel=1e-6)
    # unigram, brute force over the documents
    counts = np.zeros(512)
    for doc in corpus.select(split="train").tolist():
        for token in corpus.document_tokens(doc).tolist():
            counts[token] += 1
    probabilities = (counts + 1) / (counts.sum() + 512)
    nats = -sum(np.log(probabilities[corpus.document_tokens(doc)]).sum() for doc in documents.tolist())
    unigram = unigram_bits_per_byte(corpus, 3000)
    assert unigram.tokens == tokens and unigram.bits_per_byte == pytest.approx(nats / np.log(2) / n_bytes, rel=1e-9)


# --- configs and bad input -------------------------------------------------------------------


def test_default_config_file_is_the_default_suite() -> None:
    config = load_train_config(REPO / "configs" / "suite-default.toml")
    assert config == SuiteTrainConfig()
    assert len(config.sizes) >= 3 and config.vocab_size == 4096
    assert load_train_config(None) == config


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = SuiteTrainConfig(name="x", seeds=[0, 3], steps=64)
    path = tmp_path / "x.toml"
    path.write_text(config_to_toml(config))
    assert load_train_config(path) == config
    assert [run[0] for run in config.runs()][:2] == [config.sizes[0].label, f"{config.sizes[0].label}-seed3"]
    assert learning_rate(1, 100, 5, 1.0, 0.1) == pytest.approx(0.2) and learning_rate(100, 100, 5, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stepz = 3\n", "unknown key(s) stepz"),
        ("sizes = []\n", "sizes is empty"),
        ('[[sizes]]\nlabel = "a"\nhidden_size = 0\nnum_layers = 1\nheads = 1\n', "hidden_size must be at least 1"),
        ('[[sizes]]\nlabel = "a"\nhidden_size = 32\nnum_layers = 1\nheads = 1\nwidth = 3\n', "unknown key(s) width"),
        ('[[sizes]]\nlabel = "a"\nhidden_size = 24\nnum_layers = 1\nheads = 2\n', "multiple of 8"),
        ("steps = 0\n", "steps must be at least 1"),
        ('steps = "many"\n', "steps must be int"),
        ("seeds = [1, 1]\n", "distinct"),
    ],
)
def test_bad_configs_are_refused_with_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(LmscopeError) as error:
        load_train_config(path)
    assert message in str(error.value) and "\n" not in str(error.value) and str(error.value).endswith(".")


def test_cli_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    missing.write_text('corpus = "/nonexistent/docs.jsonl"\n')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 1\n")
    for config, expected in ((missing, "does not exist"), (unknown, "unknown key(s) colour")):
        result = subprocess.run([sys.executable, "-m", "lmscope.cli", "suite", "train", str(config), "--out", str(tmp_path / "o")],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_cached_suites_are_named_by_config_and_documents(trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.suites.train import suite_dir_for

    monkeypatch.setenv("LMSCOPE_HOME", str(tmp_path / "home"))
    config = load_train_config(trained["config"])
    name = suite_dir_for(config, trained["documents"])
    assert name.parent == tmp_path / "home" / "suites" and re.fullmatch(r"test-[0-9a-f]{12}", name.name)
    assert suite_dir_for(load_train_config(trained["config"]), trained["documents"]) == name
    config.steps += 1
    assert suite_dir_for(config, trained["documents"]) != name


def test_a_directory_holding_another_suite_is_refused(trained: dict) -> None:
    other = SuiteTrainConfig(name="other", corpus=str(trained["documents"]))
    with pytest.raises(LmscopeError, match="holds a different suite"):
        train_suite(other, trained["suite"])


def test_study_on_a_trained_suite_reports_learning_and_step0(trained: dict, tmp_path: Path) -> None:
    """The main job on a mini suite: a checkpoint of it, its own corpus, the suite's summary, the sweep and the report."""
    import re

    import pyarrow.parquet as pq

    from lmscope.evals.sweep import METRICS
    from explain_fixtures import tiny_chat_model
    from lmscope.study import (ActivationsConfig, EvalConfig, ExplainStudyConfig, InfluenceStudyConfig, SaeStudyConfig, StudyConfig,
                               TraceStudyConfig, run_study)
    from lmscope.suites.replay import open_source, replay_step

    suite = trained["suite"]
    explainer = tmp_path / "explainer"  # a tiny random chat model: the pipeline is under test here, not the explainer's wit
    tiny_chat_model(explainer, tokenizer_dir=suite / "tokenizer")
    config = StudyConfig(name="mini", model=f"{suite}/s32@step{STEPS}", corpus=str(suite / "corpus"), device="cpu",
                         suite=str(suite), activations=ActivationsConfig(hooks=["blocks.0.hook_resid_post"], tokens=256, ctx=32),
                         eval=EvalConfig(select=f"0,{STEPS}", documents_per_domain=2, memorization_sequences=16),
                         sae=SaeStudyConfig(size="s32", hook="blocks.1.hook_resid_post", width=128, k=4, tokens=4096,
                                            epochs=2, batch_size=256, cards=3, track_select=f"0,{STEPS}", track_cards=2),
                         trace=TraceStudyConfig(size="s64", prompts=["def ", "import "], max_new_tokens=24, min_length=3),
                         influence=InfluenceStudyConfig(size="s64", select=f"10,{STEPS}", fit_rows=32, candidates_top=24, top=3,
                                                        completion_tokens=8),
                         explain=ExplainStudyConfig(explainer=str(explainer), features=2, neurons=2, neuron_hook="blocks.1.mlp.hook_post",
                                                    window=6, top=1, quantile=0, random=1, quiet=1, cards=2))
    result = run_study(config, tmp_path)
    summary = result["suite"]
    check = trained["summary"]
    assert summary["unigram_bits_per_byte"] == check["unigram_bits_per_byte"]
    assert {m["model"]: m["heldout_bits_per_byte"] for m in summary["models"]} == {
        m["size"]: m["heldout_bits_per_byte"] for m in check["models"]}
    from lmscope.results.query import query_results

    rows = query_results("SELECT model, step, tokens_seen, value FROM results WHERE metric = 'bits_per_byte' AND model != 'unigram' "
                         "AND domain = 'heldout'", [tmp_path / "mini"]).to_pylist()
    assert {r["model"]: r["value"] for r in rows} == {m["size"]: m["heldout_bits_per_byte"] for m in check["models"]}
    assert all(r["step"] == STEPS and r["tokens_seen"] == STEPS * BATCH * SEQ for r in rows)
    batch = replay_step(open_source(str(suite)), 0)
    assert summary["step0_rows"] == BATCH == len(batch.rows)
    assert sum(summary["step0_domains"].values()) == sum(piece.length for pieces in batch.segments for piece in pieces)

    run = tmp_path / "mini"
    evaluation = result["evaluation"]
    assert evaluation["steps"] == [0, STEPS] and evaluation["models"] == ["s16", "s32", "s64"] and evaluation["metrics"] == list(METRICS)
    table = pq.read_table(run / evaluation["results"])
    assert {"bits_per_byte", "memorization_score", "icl_score", "induction_score", "lens_kl"} <= set(table.column("metric").to_pylist())
    assert {r["lens"] for r in table.to_pylist() if r["metric"] == "lens_kl"} == {"logit", "tuned"}
    page = (run / "report.html").read_text()
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,", page)
    trace_cards = sum(min(6, t["documents"]) for t in result["trace"]["traces"])  # up to six documents per trace
    assert page.count("<div class='card'>") == 3 + 2 + trace_cards + 2 and "Sparse autoencoder features" in page
    assert "Features across training" in page and "lineage " in page
    track = result["sae_track"]
    assert track["steps"] == [0, STEPS] and (run / "results" / "sae_track.parquet").is_file()
    # every traced match is really in the corpus at its document and offset (read here from the corpus itself)
    corpus = TokenizedCorpus.open(suite / "corpus")
    trace = result["trace"]
    assert [t["prompt"] for t in trace["traces"]] == ["def ", "import "] and "Tracing generations into the training data" in page
    matched = 0
    for entry in trace["traces"]:
        data = json.loads((run / "traces" / entry["json"]).read_text())
        assert (run / "traces" / entry["html"]).is_file() and entry["spans"] == len(data["spans"])
        for span in data["spans"]:
            assert data["tokens"][span["start"]:span["stop"]] == span["tokens"] and span["stop"] - span["start"] >= 3
            for where in span["documents"]:
                doc = corpus.document_tokens(where["doc_index"])
                assert doc[where["offset"]:where["offset"] + len(span["tokens"])].tolist() == span["tokens"]
                matched += 1
    assert matched == sum(len(s["documents"]) for t in trace["traces"] for s in
                          json.loads((run / "traces" / t["json"]).read_text())["spans"]) and matched > 0
    trace_rows = pq.read_table(run / "results" / "trace.parquet").to_pylist()
    assert {(r["prompt"], r["metric"]) for r in trace_rows} >= {("def ", "trace_spans"), ("import ", "trace_documents")}
    sae = result["sae"]
    assert sae["identity"]["step"] == STEPS and sae["reconstruction"]["l0"] == 4.0 and sae["reconstruction"]["fvu"] < 1
    sae_rows = {r["metric"]: r for r in pq.read_table(run / "results" / "sae.parquet").to_pylist()}
    assert sae_rows["sae_fvu"]["value"] == sae["reconstruction"]["fvu"] and sae_rows["sae_fvu"]["model"] == "s32"
    # influence: the traced generations are the queries; each checkpoint's measurement is the completion's log-probability,
    # recomputed here with a plain forward pass; every shown row is the train.bin row at its position
    influence = result["influence"]
    assert influence["steps"] == [10, STEPS] and influence["queries_from"] == "trace" and "influence functions" in page
    across = json.loads((run / "influence" / "across.json").read_text())
    rows_data = MegatronDataset(suite / "data" / "train")
    for q, entry in enumerate(trace["traces"]):
        data = json.loads((run / "traces" / entry["json"]).read_text())
        ids = torch.tensor([data["prompt_tokens"] + data["tokens"][:8]])
        for step in (10, STEPS):
            from lmscope.models.loading import load_model

            model = load_model(f"{suite}/s64@step{step}", device="cpu").model
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            expected = float(logp[len(data["prompt_tokens"]) - 1:].sum())
            assert abs(across["queries"][q]["completion_logprob"][f"step{step}"] - expected) < 1e-3
        final = json.loads((run / "influence" / f"step{STEPS}.json").read_text())["queries"][q]
        for row in final["proponents"] + final["opponents"]:
            assert row["step"] == row["position"] // BATCH and row["seen"] == (row["position"] < BATCH * STEPS)
            assert len(row["token_scores"]) == SEQ and row["token_ids"] == np.asarray(rows_data.get(row["position"]))[:-1].tolist()
        for row in across["queries"][q]["top"]:
            assert row["seen_by"] == [f"step{s}" for s in (10, STEPS) if row["position"] < BATCH * s]
    positions = json.loads((run / "influence" / f"step{STEPS}.json").read_text())["queries"][0]["positions"]
    assert len(positions) >= 24 and all(0 <= p < BATCH * STEPS for p in positions)
    influence_rows = pq.read_table(run / "results" / "influence.parquet").to_pylist()
    assert {r["metric"] for r in influence_rows} == {"influence_completion_logprob", "influence_top_score", "influence_top_rows_seen"}
    # explanations: the SAE's features and the MLP's neurons, each scored with its own and a shuffled explanation, and the
    # track's longest-lived lineage explained at each checkpoint where it is alive
    explain = result["explain"]
    assert set(explain["runs"]) == {"features", "neurons"} and "automated explanations" in page
    explain_rows = pq.read_table(run / "results" / "explain.parquet").to_pylist()
    assert {(r["unit_kind"], r["explanation_source"]) for r in explain_rows} == {
        (kind, source) for kind in ("feature", "neuron") for source in ("own", "shuffled")}
    assert {r["model"] for r in explain_rows} == {"s32"} and {r["step"] for r in explain_rows} == {STEPS}
    timeline = pq.read_table(run / "sae-track" / "timeline.parquet").to_pylist()
    lineage = explain["track"]["lineage"]
    assert [h["step"] for h in explain["track"]["history"]] == sorted(r["step"] for r in timeline if r["lineage"] == lineage)
    assert len(images) == 12 and "Memorization of training sequences against when they were seen" in images
    assert "Explanation scores: SAE features against neurons, own explanations against shuffled ones" in images
    assert "Influence against the step each row was trained at" in images
    assert "SAE latents across training" in images
    # nothing loaded by URL (the corpus text shown in cards may mention URLs, escaped, as text)
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page) and "<script" not in page
    assert "<link" not in page and "url(" not in page[page.index("<style>"):page.index("</style>")]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"report.html", "results/eval.parquet", "figures/memorization.png"} <= {a["path"] for a in manifest["artifacts"]}
    cached = sorted((run / "cache").glob("*.parquet"))
    assert len(cached) == 3 * 2 * len(METRICS)
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = run_study(config, tmp_path)
    assert [p.stat().st_mtime_ns for p in cached] == stamps and again["evaluation"] == evaluation


def test_eval_sweep_over_the_suite_matches_direct_computation_and_caches(trained: dict, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from lmscope.data.tokenized import TokenizedCorpus
    from lmscope.evals.bpb import bits_per_byte_by_domain
    from lmscope.evals.sweep import run_sweep
    from lmscope.models.loading import load_model

    suite = trained["suite"]
    path = run_sweep(str(suite), suite / "corpus", tmp_path, select=f"0,{STEPS}", max_documents=4, device="cpu")
    rows = [r for r in pq.read_table(path).to_pylist() if r["domain"] == "all"]
    assert {(r["model"], r["step"]) for r in rows} == {(m, s) for m in ("s16", "s32", "s64") for s in (0, STEPS)}
    assert all(r["tokens_seen"] == r["step"] * BATCH * SEQ for r in rows)
    row = next(r for r in rows if r["model"] == "s32" and r["step"] == STEPS)
    loaded = load_model(f"{suite}/s32@step{STEPS}", device="cpu")
    direct = bits_per_byte_by_domain(loaded.model, TokenizedCorpus.open(suite / "corpus"), max_documents=4, tokenizer=loaded.tokenizer)
    assert row["value"] == direct[-1].bits_per_byte
    final = {r["model"]: r["value"] for r in rows if r["step"] == STEPS}
    initial = {r["model"]: r["value"] for r in rows if r["step"] == 0}
    assert all(final[m] < initial[m] for m in final)
    cached = sorted((tmp_path / "cache").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    run_sweep(str(suite), suite / "corpus", tmp_path, select=f"0,{STEPS}", max_documents=4, device="cpu")
    assert [p.stat().st_mtime_ns for p in cached] == stamps, "a rerun recomputed cached work"
    assert (tmp_path / "bits_per_byte.png").exists() is False  # plots are the CLI's job


def test_eval_cli_bad_input(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(trained["suite"]), "--metrics", "bpb,perplexity", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "default", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_eval_cli_memorization_and_tuned_lens(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmscope eval --metrics memorization,tuned_lens --json` on one size: rows, exposure steps from replay, figures."""
    from lmscope.evals.memorization import sample_trained_sequences
    from lmscope.suites.replay import open_source

    suite = trained["suite"]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", f"{suite}/s16", "--select", f"0,{STEPS // 2}", "--metrics", "memorization,tuned_lens",
              "--memorization-sequences", "24", "--out", str(tmp_path), "--device", "cpu", "--json"])
    assert not exit_info.value.code
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    per_sequence = [r for r in rows if r["metric"] == "memorization_score" and r["step"] == STEPS // 2]
    expected = sample_trained_sequences(open_source(str(suite)), n_sequences=24, seed=0)
    assert [(r["row"], r["step_seen"]) for r in per_sequence] == [(s.row, s.step) for s in expected]
    assert all(r["seen"] == (r["step_seen"] < STEPS // 2) for r in per_sequence)
    assert {r["lens"] for r in rows if r["metric"] == "lens_kl"} == {"tuned"}
    assert {Path(p).stem for p in out["plots"]} >= {"overview", "memorization", "lens_kl"}
    with pytest.raises(SystemExit) as exit_info:  # a single model has no data order to sample from
        main(["eval", f"{suite}/s16@step{STEPS}", "--corpus", str(suite / "corpus"), "--metrics", "memorization",
              "--out", str(tmp_path / "single")])
    assert exit_info.value.code == 2
    assert "needs the data order of a suite" in capsys.readouterr().err


def test_eval_sweep_icl_and_induction_rows(trained: dict, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from lmscope.evals.sweep import run_sweep

    suite = trained["suite"]
    path = run_sweep(f"{suite}/s16", suite / "corpus", tmp_path, select=f"{STEPS}", metrics=("icl", "induction", "lens"),
                     max_documents=4, device="cpu")
    rows = pq.read_table(path).to_pylist()
    icl_rows = [r for r in rows if r["metric"] == "icl_score"]
    heads = [r for r in rows if r["metric"] == "induction_score"]
    assert len(icl_rows) == 1 and icl_rows[0]["model"] == "s16" and icl_rows[0]["step"] == STEPS
    assert len(heads) == 1 * 2 and all(0.0 <= r["value"] <= 1.0 for r in heads)  # s16: 1 layer x 2 heads
    lens_kl = [r for r in rows if r["metric"] == "lens_kl"]
    assert len(lens_kl) == 1 and abs(lens_kl[0]["value"]) <= 1e-9  # one layer: its lens is the model


def test_sae_track_across_checkpoints(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmscope sae track SUITE/SIZE`: one SAE per checkpoint, each from the previous; the timeline's alive latents
    are the ones that fire when each saved SAE encodes its checkpoint's activations, computed here."""
    from lmscope.activations.reader import ActivationStore
    from lmscope.sae.io import load_sae
    from lmscope.sae.track import decoder_cosines

    suite, out = trained["suite"], tmp_path / "track"
    args = ["sae", "track", f"{suite}/s32", "--hook", "blocks.1.hook_resid_post", "--select", f"0,{STEPS // 2},{STEPS}",
            "--out", str(out), "--width", "64", "--k", "4", "--tokens", "2048", "--ctx", "32", "--batch-size", "256",
            "--device", "cpu", "--json"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert not exit_info.value.code
    result = json.loads(capsys.readouterr().out)
    steps = [0, STEPS // 2, STEPS]
    assert result["steps"] == steps and [Path(p).name for p in result["figures"]] == ["sae_track.png", "sae_lineages.png"]
    timeline = pq.read_table(out / "timeline.parquet").to_pylist()
    saes = {}
    for step in steps:
        sae, _ = load_sae(out / f"step{step}" / "sae")
        store = ActivationStore.open(out / f"step{step}" / "activations")
        with torch.no_grad():
            fired = (sae.encode(store.rows("blocks.1.hook_resid_post", slice(None)).float()) > 0).any(0)
        assert {r["feature"] for r in timeline if r["step"] == step} == set(torch.nonzero(fired).flatten().tolist())
        saes[step] = sae
        source = torch.load(out / f"step{step}" / "train" / "checkpoint.pt", weights_only=True)["source"]
        assert ("init_sha256" in source) == (step != 0)  # later SAEs start from the previous one
    for r in timeline:
        if r["previous_feature"] is not None:
            before = steps[steps.index(r["step"]) - 1]
            cosine = decoder_cosines(saes[before].W_dec[r["previous_feature"]][None], saes[r["step"]].W_dec[r["feature"]][None])
            assert r["cosine_previous"] == pytest.approx(float(cosine)) and r["cosine_previous"] >= 0.7
    rows = pq.read_table(out / "results.parquet").to_pylist()
    alive = {r["step"]: r["value"] for r in rows if r["metric"] == "sae_track_alive"}
    assert alive == {s: float(sum(r["step"] == s for r in timeline)) for s in steps}
    assert {r["step"] for r in rows if r["metric"] == "sae_fvu"} == set(steps) and all(r["model"] == "s32" for r in rows)

    stamps = [p.stat().st_mtime_ns for p in sorted(out.glob("step*/sae/*"))]
    with pytest.raises(SystemExit) as exit_info:  # a rerun resumes: nothing is retrained
        main(args)
    assert not exit_info.value.code and [p.stat().st_mtime_ns for p in sorted(out.glob("step*/sae/*"))] == stamps
    capsys.readouterr()
    for bad, message in ((["--select", "0"], "at least two"), (["--width", "32"], "other settings")):
        with pytest.raises(SystemExit) as exit_info:
            main(args[:-1] + bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
