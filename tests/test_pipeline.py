"""End to end on a tiny model: tokenized corpus → `lmscope activations` → `lmscope study`, checked against HF outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import build_bpe_tokenizer, corpus_records, write_jsonl
from lmscope.activations.reader import ActivationStore
from lmscope.data.tokenize_job import tokenize_corpus
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError
from lmscope.study import ActivationsConfig, StudyConfig, config_to_toml, load_study_config, run_study
from tiny_models import tiny_model

VOCAB = 400


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "model"
    build_bpe_tokenizer(model_dir, vocab_size=VOCAB)
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(model_dir)
    documents = write_jsonl(root / "docs.jsonl", corpus_records(120))
    tokenize_corpus(documents, str(model_dir), root / "corpus", heldout_fraction=0.3)
    return {"root": root, "model": model_dir, "corpus": root / "corpus"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmscope.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ})


def test_activations_command_matches_hf_hidden_states(workspace: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "acts"
    result = _cli("activations", "--model", str(workspace["model"]), "--hook", "blocks.1.hook_resid_post",
                  "--hook", "blocks.0.mlp.hook_post", "--corpus", str(workspace["corpus"]), "--tokens", "300",
                  "--ctx", "16", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 300
    store = ActivationStore.open(out, verify=True)
    assert store.d("blocks.1.hook_resid_post") == 32 and store.d("blocks.0.mlp.hook_post") == 64
    # Independent truth: HF's own hidden states on each stored context.
    model = tiny_model("llama", vocab_size=VOCAB)
    corpus = TokenizedCorpus.open(workspace["corpus"])
    meta = store.metadata
    rows = store.rows("blocks.1.hook_resid_post", slice(None))
    for context in sorted(set(meta["context"].tolist()))[:5]:
        mask = meta["context"] == context
        doc, positions = int(meta["doc_index"][mask][0]), meta["position"][mask]
        tokens = torch.from_numpy(corpus.document_tokens(doc).astype("int64"))[positions[0] : positions[-1] + 1]
        assert tokens.tolist() == meta["token"][mask].tolist()
        assert corpus.documents.column("split")[doc].as_py() == "heldout"
        with torch.no_grad():
            hidden = model(tokens[None], output_hidden_states=True).hidden_states[2][0]
        assert (rows[torch.from_numpy(mask)] - hidden).abs().max() <= 1e-5


def test_activations_command_bad_hook_lists_valid_ones(workspace: dict[str, Path], tmp_path: Path) -> None:
    result = _cli("activations", "--model", str(workspace["model"]), "--hook", "blocks.9.hook_resid_post",
                  "--corpus", str(workspace["corpus"]), "--tokens", "10", "--out", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "unknown hook 'blocks.9.hook_resid_post'; valid hooks are" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tmp_path / "a").exists()


def _config(workspace: dict[str, Path], **changes: object) -> StudyConfig:
    acts = ActivationsConfig(hooks=["blocks.2.hook_resid_post"], tokens=200, ctx=16, batch_size=4)
    return StudyConfig(name="t", model=str(workspace["model"]), corpus=str(workspace["corpus"]), device="cpu",
                       activations=acts, suite="none", **changes)


def test_study_writes_a_complete_run_directory(workspace: dict[str, Path], tmp_path: Path) -> None:
    config = _config(workspace)
    summary = run_study(config, tmp_path)
    run = tmp_path / "t"
    assert load_study_config(run / "study.toml") == config
    assert summary["activations"][0]["rows"] == 200 and sum(summary["activation_rows_by_domain"].values()) == 200
    manifest = json.loads((run / "manifest.json").read_text())
    from lmscope.fsio import sha256_file

    for artifact in manifest["artifacts"]:
        assert sha256_file(run / artifact["path"]) == artifact["sha256"]
    assert manifest["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    # Independent check of the summary statistic against the stored rows.
    rows = ActivationStore.open(run / "activations").rows("blocks.2.hook_resid_post", slice(None)).double()
    assert summary["activations"][0]["mean_row_norm"] == pytest.approx(rows.norm(dim=-1).mean().item(), rel=1e-9)
    # The study's numbers are in the results schema, queryable with SQL.
    from lmscope.results.query import query_results

    queried = query_results("SELECT value FROM results WHERE metric = 'activation_mean_row_norm'", [run])
    assert queried.column("value").to_pylist() == [summary["activations"][0]["mean_row_norm"]]
    # A rerun resumes (nothing to recompute) and a different study under the same name is refused.
    assert run_study(config, tmp_path)["activations"] == summary["activations"]
    with pytest.raises(LmscopeError, match="holds a different study"):
        run_study(_config(workspace, dtype="bfloat16"), tmp_path)


def test_study_config_round_trip_and_bad_keys(tmp_path: Path) -> None:
    config = StudyConfig(name="x", activations=ActivationsConfig(hooks=["blocks.0.hook_resid_pre", "hook_embed"]))
    path = tmp_path / "s.toml"
    path.write_text(config_to_toml(config))
    assert load_study_config(path) == config
    path.write_text('[study]\nname = "x"\nmodle = "default"\n')
    with pytest.raises(LmscopeError, match="unknown key\\(s\\) modle"):
        load_study_config(path)
    path.write_text("[study\n")
    with pytest.raises(LmscopeError, match="not valid TOML"):
        load_study_config(path)
    with pytest.raises(LmscopeError, match="split 'test' is not a split"):
        ActivationsConfig(split="test")  # type: ignore[arg-type]
    # the SAE track and the trace sections read back, and refuse nonsense with one sentence
    traced = StudyConfig(name="t", sae={"track_select": "0,512", "track_cards": 1}, trace={"prompts": ["a b", 'say "x"'], "step": 64})
    path.write_text(config_to_toml(traced))
    assert load_study_config(path) == traced and load_study_config(path).trace.prompts == ["a b", 'say "x"']
    path.write_text('[study]\nname = "x"\n[study.trace]\nprompts = []\n')
    with pytest.raises(LmscopeError, match="at least one prompt"):
        load_study_config(path)
    asked = StudyConfig(name="i", influence={"queries": [{"prompt": "The ", "completion": 'say "x"'}], "select": "log:3"})
    path.write_text(config_to_toml(asked))
    assert load_study_config(path) == asked and load_study_config(path).influence.queries[0]["completion"] == 'say "x"'
    path.write_text('[study]\nname = "x"\n[study.influence]\nqueries = [{prompt = "a"}]\n')
    with pytest.raises(LmscopeError, match="exactly the keys prompt and completion"):
        load_study_config(path)
    path.write_text('[study]\nname = "x"\n[study.trace]\nprompt = ["a"]\n')
    with pytest.raises(LmscopeError, match="unknown key\\(s\\) prompt"):
        load_study_config(path)


def test_study_command_json(workspace: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(config_to_toml(_config(workspace)))
    result = _cli("study", str(path), "--runs-dir", str(tmp_path / "runs"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_type"] == "llama" and summary["activations"][0]["hook"] == "blocks.2.hook_resid_post"
    missing = _cli("study", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
