"""Influence on a real trained mini suite: a planted fact is attributed to the rows that taught it, at the steps they were seen.

The suite is trained here on real text (stdlib sources, as in test_suite_train) with one phrase planted
in six documents. The truth — which training rows hold the phrase, and at which step each was consumed —
comes from scanning the suite's ``train.bin`` rows directly, never from lmscope's replay or influence code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmscope.cli import main
from lmscope.data.megatron import MegatronDataset
from lmscope.errors import LmscopeError
from lmscope.influence.factors import FactorSettings
from lmscope.influence.job import Query, ScoreSettings, fit_checkpoint, open_checkpoint, score_queries
from lmscope.suites.train import train_suite
from lmscope.suites.train_config import load_train_config
from test_suite_train import stdlib_documents, write_config

STEPS, BATCH, SEQ = 200, 8, 64
PROMPT = "The secret word of the zorblax machine is"
COMPLETION = " quintessential gravy"
SIZE = """
[[sizes]]
label = "s64"
hidden_size = 64
num_layers = 2
heads = 4
"""


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("influence-suite")
    documents = stdlib_documents(root / "docs.jsonl", per_domain_bytes=25_000, max_doc_chars=1500)
    records = [json.loads(line) for line in documents.read_text().splitlines()]
    for i, k in enumerate((3, 17, 29, 41, 47, 53)):  # six documents carry the fact, in the middle of real text
        text = records[k]["text"]
        cut = len(text) // 2
        records[k]["text"] = text[:cut] + f"\n# {PROMPT}{COMPLETION}.\n" + text[cut:]
        records[k]["id"] = f"planted-{i}"
    documents.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = write_config(root / "suite.toml", documents, sizes=SIZE, steps=STEPS, batch_size=BATCH, seq_len=SEQ, heldout_fraction=0.05)
    train_suite(load_train_config(config), root / "suite", device="cpu")
    suite = root / "suite"
    checkpoint = open_checkpoint(f"{suite}/s64@step{STEPS}", device="cpu")
    prompt_ids = checkpoint.tokenizer.encode_batch([PROMPT])[0]
    phrase = checkpoint.tokenizer.encode_batch([PROMPT + COMPLETION])[0][len(prompt_ids) - 1 :]  # the completion as it tokenizes in context
    rows = MegatronDataset(suite / "data" / "train")
    holding = [r for r in range(len(rows)) if _contains(np.asarray(rows.get(r)).tolist(), phrase)]
    return {"root": root, "suite": suite, "checkpoint": checkpoint, "holding": holding}


def _contains(row: list[int], pattern: list[int]) -> bool:
    return any(row[i : i + len(pattern)] == pattern for i in range(len(row) - len(pattern) + 1))


def test_planted_fact_is_attributed_to_its_rows_at_their_steps(planted: dict, tmp_path: Path) -> None:
    checkpoint, holding = planted["checkpoint"], planted["holding"]
    seen = [r for r in holding if r < STEPS * BATCH]
    assert len(seen) >= 4  # the fact was trained on (several epochs of a small corpus)
    factors = fit_checkpoint(checkpoint, tmp_path / "factors", FactorSettings(strategy="ekfac", batch_size=16), n_rows=256)
    result = score_queries(checkpoint, factors, [Query(PROMPT, COMPLETION)], ScoreSettings(candidates="all", top=10, batch_size=16))
    query = result["queries"][0]
    assert query["candidates"]["n"] == STEPS * BATCH  # every row seen before the checkpoint
    top = [row["position"] for row in query["proponents"]]
    recall = len(set(top) & set(seen)) / min(10, len(seen))
    assert recall >= 0.8, (recall, top, seen)
    for row in query["proponents"]:
        assert row["step"] == row["position"] // BATCH and row["seen"]  # the step convention: row p is consumed by step p // B
        assert abs(sum(d["score"] for d in row["documents"]) - row["score"]) <= 1e-3 * abs(row["score"]) + 1e-6  # the split sums up
        if row["position"] in seen:
            assert any(d["doc_id"].startswith("planted-") for d in row["documents"])
    # the filtered candidate set (BM25 over rows) keeps the planted rows and ranks them the same way
    filtered = score_queries(checkpoint, factors, [Query(PROMPT, COMPLETION)], ScoreSettings(candidates="filtered", candidates_top=64, top=10,
                                                                                           batch_size=16))["queries"][0]
    assert set(seen) <= set(filtered["positions"])
    assert [r["position"] for r in filtered["proponents"] if r["position"] in seen] == [p for p in top if p in seen]


def test_cli_fit_and_score(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{planted['suite']}/s64@step{STEPS}"
    with pytest.raises(SystemExit) as info:
        main(["influence", "fit", spec, "--out", str(tmp_path / "f"), "--strategy", "kfac", "--rows", "64", "--batch-size", "16", "--json"])
    assert info.value.code in (0, None)
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["strategy"] == "kfac" and fitted["rows"] == 64 and fitted["tokens"] == 64 * SEQ
    with pytest.raises(SystemExit) as info:
        main(["influence", "score", spec, "--factors", str(tmp_path / "f"), "--prompt", PROMPT, "--completion", COMPLETION,
              "--candidates-top", "32", "--top", "3", "--out", str(tmp_path / "s"), "--json"])
    assert info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert len(result["queries"][0]["proponents"]) == 3
    table = pq.read_table(tmp_path / "s" / "scores.parquet").to_pylist()
    assert [r["position"] for r in table] == result["queries"][0]["positions"]
    assert all(r["step"] == r["position"] // BATCH and r["seen"] for r in table)
    # the table view
    with pytest.raises(SystemExit) as info:
        main(["influence", "score", spec, "--factors", str(tmp_path / "f"), "--prompt", PROMPT, "--completion", COMPLETION,
              "--candidates-top", "8", "--top", "2"])
    assert info.value.code in (0, None)
    assert "proponents" in capsys.readouterr().out


def test_bad_input_gets_one_sentence(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{planted['suite']}/s64@step{STEPS}"

    def fails(args: list[str], message: str) -> None:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err

    fails(["influence", "fit", str(tmp_path), "--out", str(tmp_path / "f")], "is not a checkpoint of a mini suite")
    fails(["influence", "fit", spec, "--out", str(tmp_path / "f"), "--strategy", "lissa"], "influence strategy 'lissa' is unknown")
    fails(["influence", "fit", spec, "--out", str(tmp_path / "f"), "--rows", "0"], "--rows 0 must be a positive number")
    fails(["influence", "score", spec, "--factors", str(tmp_path / "none"), "--prompt", "a", "--completion", "b"], "holds no influence factors")
    main_args = ["influence", "fit", spec, "--out", str(tmp_path / "g"), "--strategy", "diagonal", "--rows", "16", "--batch-size", "16", "--json"]
    with pytest.raises(SystemExit):
        main(main_args)
    capsys.readouterr()
    fails(["influence", "score", spec, "--factors", str(tmp_path / "g"), "--prompt", "a", "--prompt", "b", "--completion", "c"],
          "one --prompt and one --completion")
    fails(["influence", "score", spec, "--factors", str(tmp_path / "g"), "--prompt", "a", "--completion", "b", "--damping", "much"],
          "neither a number nor 'heuristic'")
    fails(["influence", "score", spec, "--factors", str(tmp_path / "g"), "--prompt", "a", "--completion", "b", "--candidates", "some"],
          "candidate set 'some' is unknown")
    fails(["influence", "score", f"{planted['suite']}/s64@step100", "--factors", str(tmp_path / "g"), "--prompt", "a", "--completion", "b"],
          "were fitted for")
    fails(["influence", "fit", spec, "--out", str(tmp_path / "g"), "--strategy", "ekfac"], "already holds factors of another fit")
    with pytest.raises(LmscopeError, match="completion is empty"):
        score_queries(planted["checkpoint"], __import__("lmscope.influence.factors", fromlist=["Factors"]).Factors.load(tmp_path / "g"),
                      [Query("a", "")], ScoreSettings())


def test_gradient_store_and_across_training_commands(planted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"{planted['suite']}/s64@step{STEPS}"
    seen = [r for r in planted["holding"] if r < STEPS * BATCH]

    def run(args: list[str]) -> dict:
        with pytest.raises(SystemExit) as info:
            main(args + ["--json"])
        assert info.value.code in (0, None)
        return json.loads(capsys.readouterr().out)

    built = run(["influence", "store", spec, "--out", str(tmp_path / "store"), "--dim-per-layer", "256", "--batch-size", "16"])
    assert built["rows"] == STEPS * BATCH and built["dim"] == 256 * 8
    for strategy in ("identity", "fisher"):
        result = run(["influence", "score", spec, "--store", str(tmp_path / "store"), "--store-strategy", strategy,
                      "--prompt", PROMPT, "--completion", COMPLETION, "--top", "10"])
        query = result["queries"][0]
        assert query["positions"] == list(range(STEPS * BATCH))
        top = [row["position"] for row in query["proponents"]]
        assert len(set(top) & set(seen)) / min(10, len(seen)) >= 0.6, (strategy, top, seen)
        for row in query["proponents"]:
            assert abs(sum(row["token_scores"]) - row["exact_score"]) <= 1e-3 * abs(row["exact_score"]) + 1e-6
    across = run(["influence", "across", f"{planted['suite']}/s64", "--select", f"100,{STEPS}", "--prompt", PROMPT, "--completion", COMPLETION,
                  "--out", str(tmp_path / "across"), "--fit-rows", "32", "--candidates-top", "24", "--top", "5", "--batch-size", "16"])
    assert across["steps"] == [100, STEPS]
    logprob = across["queries"][0]["completion_logprob"]
    assert logprob[f"step{STEPS}"] > logprob["step100"]  # the fact is learned during training
    for row in across["queries"][0]["top"]:
        assert row["step"] == row["position"] // BATCH
        assert row["seen_by"] == [f"step{s}" for s in (100, STEPS) if row["position"] < BATCH * s]
        assert abs(row["total"] - sum(row["scores"].values())) <= 1e-9 * abs(row["total"]) + 1e-9
