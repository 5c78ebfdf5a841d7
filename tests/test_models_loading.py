"""Loading model specs: local directories, local suites, the hub cache offline, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.models.loading import load_model, resolve_dtype
from lmscope.suites.revisions import nearest_revisions
from lmscope.models.spec import parse_spec
from tiny_models import tiny_inputs, tiny_model


def test_parse_spec_forms(tmp_path: Path) -> None:
    assert parse_spec("default").kind == "default"
    hub = parse_spec("EleutherAI/pythia-70m@step3000")
    assert (hub.kind, hub.name, hub.revision) == ("hub", "EleutherAI/pythia-70m", "step3000")
    assert parse_spec("hf:allenai/OLMo-1B-hf@step1000-tokens4B").revision == "step1000-tokens4B"
    assert parse_spec("gguf:models/x.gguf").kind == "gguf"
    local = parse_spec(f"{tmp_path}@step8")
    assert (local.kind, local.name, local.revision) == ("local", str(tmp_path), "step8")


@pytest.mark.parametrize("bad", ["", "a/b/c", "gguf:file.bin", "EleutherAI/pythia-70m@"])
def test_parse_spec_rejects_malformed(bad: str) -> None:
    with pytest.raises(LmscopeError):
        parse_spec(bad)


def _save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def test_local_directory_loads_the_same_model(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    loaded = load_model(str(_save(model, tmp_path / "m")), device="cpu")
    ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert loaded.model.config._attn_implementation == "sdpa"


def test_dtype_option(tmp_path: Path) -> None:
    loaded = load_model(str(_save(tiny_model("llama"), tmp_path / "m")), dtype="bfloat16", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LmscopeError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_local_suite_revisions(tmp_path: Path) -> None:
    for step, seed in ((0, 0), (8, 1), (1000, 2)):
        _save(tiny_model("gpt_neox", seed=seed), tmp_path / "suite" / "checkpoints" / f"step{step}")
    suite = tmp_path / "suite"
    a = load_model(f"{suite}@step8", device="cpu").model
    b = load_model(f"{suite}@step1000", device="cpu").model
    ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, tiny_model("gpt_neox", seed=1)(ids).logits)
        assert not torch.equal(a(ids).logits, b(ids).logits)
    with pytest.raises(LmscopeError, match=r"revision 'step900' does not exist .* nearest that exist are step1000, step8, step0"):
        load_model(f"{suite}@step900", device="cpu")
    with pytest.raises(LmscopeError, match=r"is a suite of checkpoints.*@step1000"):
        load_model(str(suite), device="cpu")


def test_nearest_revisions_by_step_then_spelling() -> None:
    assert nearest_revisions("step2500", ["step1000", "step2000", "step3000", "step9000"], n=2) == ["step2000", "step3000"]
    assert nearest_revisions("ckpt_01", ["ckpt_000", "ckpt_001", "main"], n=1) == ["ckpt_001"]


def test_corrupt_weights_are_named(tmp_path: Path) -> None:
    directory = _save(tiny_model("llama"), tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LmscopeError, match=r"model\.safetensors' is corrupt or truncated"):
        load_model(str(directory), device="cpu")


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(LmscopeError, match="GGUF file .* does not exist"):
        load_model(f"gguf:{tmp_path}/nope.gguf", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmscopeError, match="holds no config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmscope.cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_hub_model_missing_offline_fails_with_one_sentence(tmp_path: Path) -> None:
    result = _cli(["models", "info", "EleutherAI/pythia-70m@step3000"], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "EleutherAI/pythia-70m@step3000 is not in the local Hugging Face cache and the hub is offline" in message
    assert "Traceback" not in result.stderr


def test_hub_model_in_the_local_cache_loads_offline(tmp_path: Path) -> None:
    """A model laid out as the hub cache lays it out loads by its hub id and revision, with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--EleutherAI--pythia-70m"
    snapshot = repo / "snapshots" / commit
    model = tiny_model("gpt_neox")
    _save(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "step3000").write_text(commit)
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); from tiny_models import tiny_model, tiny_inputs;"
        "from lmscope.models.loading import load_model;"
        "m = load_model('EleutherAI/pythia-70m@step3000', device='cpu').model;"
        "ids = tiny_inputs(); print(torch.equal(m(ids).logits, tiny_model('gpt_neox')(ids).logits))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip().endswith("True"), result.stderr


def test_models_hooks_cli_json(tmp_path: Path) -> None:
    directory = _save(tiny_model("olmo2"), tmp_path / "m")
    result = _cli(["models", "hooks", str(directory), "--json"], {})
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    names = [row["name"] for row in payload["hooks"]]
    assert payload["n_layers"] == 3 and names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    assert {"name": "blocks.2.attn.hook_pattern", "dims": ["batch", "head", "query_pos", "key_pos"],
            "shape": ["batch", 4, "query_pos", "key_pos"]} in payload["hooks"]
