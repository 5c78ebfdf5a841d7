"""Checkpoint audit on a planted mini suite: a duplicate, a missing checkpoint, a NaN, and the hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmscope.errors import LmscopeError
from lmscope.suites.audit import audit_checkpoints, audit_summary, hash_weights
from tiny_models import tiny_model


def _plant_suite(root: Path) -> Path:
    """A one-size suite whose suite.json expects steps 0, 1, 2, 4, 8; step4 is missing, step8 equals step2, step1 has a NaN."""
    size = root / "tiny"
    for step, seed in ((0, 0), (1, 1), (2, 2), (8, 2)):
        model = tiny_model("gpt_neox", seed=seed)
        if step == 1:
            with torch.no_grad():
                model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
        model.save_pretrained(size / "checkpoints" / f"step{step}")
    (root / "suite.json").write_text(json.dumps({"name": "planted", "tokens_per_step": 100, "checkpoint_steps": [0, 1, 2, 4, 8]}))
    return size


def test_audit_finds_the_planted_problems(tmp_path: Path) -> None:
    rows = audit_checkpoints(str(_plant_suite(tmp_path)))
    by_revision = {row.revision: row for row in rows}
    assert [row.revision for row in rows] == ["step0", "step1", "step2", "step4", "step8"]
    assert by_revision["step4"].status == "missing" and by_revision["step4"].tokens_seen == 400
    assert by_revision["step8"].status == "duplicate" and by_revision["step8"].duplicate_of == "step2"
    assert by_revision["step1"].status == "nonfinite" and by_revision["step1"].nonfinite == 1
    assert by_revision["step0"].status == "ok" and by_revision["step0"].parameters == sum(
        p.numel() for p in tiny_model("gpt_neox").state_dict().values()
    )
    summary = audit_summary(rows)
    assert summary["missing"] == ["step4"] and summary["nonfinite"] == ["step1"]
    assert summary["duplicate_groups"] == [{"revisions": ["step2", "step8"], "equal_to_final": True}]
    assert summary["distinct_weights"] == 3


def test_weights_hash_is_over_contents_not_file_bytes(tmp_path: Path) -> None:
    """Independent truth: the same tensors saved in another order, with other metadata, and as a pickle hash alike."""
    state = {name: t.contiguous() for name, t in tiny_model("llama").state_dict().items() if name != "lm_head.weight"}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    save_file(state, str(a / "model.safetensors"))
    save_file(dict(reversed(list(state.items()))), str(b / "model.safetensors"), metadata={"note": "other"})
    torch.save(state, c / "pytorch_model.bin")
    assert hash_weights(a) == hash_weights(b) == hash_weights(c)
    changed = dict(state)
    first = next(iter(changed))
    changed[first] = changed[first].clone()
    changed[first].view(-1)[0] += 1e-6
    save_file(changed, str(b / "model.safetensors"))
    assert hash_weights(b)[0] != hash_weights(a)[0]


def test_audit_selector_and_bad_input(tmp_path: Path) -> None:
    size = _plant_suite(tmp_path)
    assert [row.revision for row in audit_checkpoints(str(size), select="0,8")] == ["step0", "step8"]
    with pytest.raises(LmscopeError, match="names a whole suite"):
        audit_checkpoints("pythia")
    weights = size / "checkpoints" / "step2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(LmscopeError, match="step2/model.safetensors' is corrupt or truncated"):
        audit_checkpoints(str(size))


def test_audit_reads_the_hub_cache_and_reports_uncached_revisions_missing(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--EleutherAI--pythia-14m"
    for revision, seed in (("step0", 0), ("step143000", 1), ("step142000", 1)):
        commit = f"{seed:040d}"
        tiny_model("gpt_neox", seed=seed).save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    script = (
        "import json; from lmscope.suites.audit import audit_checkpoints, audit_summary;"
        "rows = audit_checkpoints('EleutherAI/pythia-14m'); print(json.dumps(audit_summary(rows)))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["checkpoints"] == 154 and summary["present"] == 3 and len(summary["missing"]) == 151
    assert summary["duplicate_groups"] == [{"revisions": ["step142000", "step143000"], "equal_to_final": True}]


def test_audit_cli_json(tmp_path: Path) -> None:
    size = _plant_suite(tmp_path)
    result = subprocess.run([sys.executable, "-m", "lmscope.cli", "suites", "audit", str(size), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["summary"]["missing"] == ["step4"]
    assert [row["status"] for row in payload["checkpoints"]] == ["ok", "nonfinite", "ok", "missing", "duplicate"]
    bad = subprocess.run([sys.executable, "-m", "lmscope.cli", "suites", "audit", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
