"""The hook parity checks on the real default model (SmolLM2-135M-Instruct, dequantised from its GGUF)."""

from __future__ import annotations

import pytest
import torch

from lmscope.models.hooks import HookedModel, zero_ablate
from lmscope.models.loading import load_model, locate_default_gguf

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default() -> HookedModel:
    return HookedModel.from_spec("default", device="cpu")


@pytest.fixture(scope="module")
def ids(default: HookedModel) -> torch.Tensor:
    return default.to_tokens("The capital of France is Paris, and the capital of Italy is")


def test_default_model_is_smollm2_and_knows_paris(default: HookedModel) -> None:
    assert default.config.model_type == "llama" and default.n_layers == 30
    assert sum(p.numel() for p in default.model.parameters()) == 134_515_008
    assert next(default.model.parameters()).dtype == torch.float32
    prompt = default.to_tokens("The capital of France is")
    out = default.model.generate(prompt, max_new_tokens=2, do_sample=False)
    assert default.tokenizer.decode(out[0, prompt.shape[1] :]).startswith(" Paris")


def test_default_hooks_leave_logits_bitwise_equal(default: HookedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        reference = default.model(ids).logits
    names = [n for n in default.hook_names() if not n.endswith("hook_pattern")]
    logits, _ = default.run_with_cache(ids, names)
    assert torch.equal(logits, reference)


def test_default_resid_post_matches_hidden_states_and_adds_up(default: HookedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        out = default.model(ids, output_hidden_states=True)
    names = [n for n in default.hook_names() if not n.endswith("hook_pattern")]
    _, cache = default.run_with_cache(ids, names, need_logits=False)
    for i in range(default.n_layers - 1):
        assert (cache[f"blocks.{i}.hook_resid_post"] - out.hidden_states[i + 1]).abs().max() <= 1e-6
    assert (cache["ln_final.hook_normalized"] - out.hidden_states[-1]).abs().max() <= 1e-6
    for i in range(default.n_layers):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        scale = post.abs().max()
        assert (pre + cache[f"blocks.{i}.hook_attn_out"] - mid).abs().max() <= 1e-6 * scale
        assert (mid + cache[f"blocks.{i}.hook_mlp_out"] - post).abs().max() <= 1e-6 * scale


def test_default_pattern_matches_output_attentions(default: HookedModel, ids: torch.Tensor) -> None:
    layers = [0, 14, 29]
    _, cache = default.run_with_cache(ids, [f"blocks.{i}.attn.hook_pattern" for i in layers], need_logits=False)
    assert default.model.config._attn_implementation == "sdpa"
    default.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = default.model(ids, output_attentions=True)
    finally:
        default.model.set_attn_implementation("sdpa")
    for i in layers:
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (1, 9, ids.shape[1], ids.shape[1])
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.equal(pattern, out.attentions[i])


def test_default_identity_edit_and_ablation(default: HookedModel, ids: torch.Tensor) -> None:
    with torch.no_grad():
        reference = default.model(ids).logits
    names = [n for n in default.hook_names() if not n.endswith("hook_pattern")]
    identity = [(name, lambda value, name: value.clone()) for name in names]
    assert torch.equal(default.run_with_hooks(ids, identity), reference)
    assert (default.run_with_hooks(ids, [("blocks.3.hook_mlp_out", zero_ablate)]) - reference).abs().max() > 1e-2


@pytest.mark.slow
def test_gguf_spec_gives_the_same_model_as_default(default: HookedModel, ids: torch.Tensor) -> None:
    """The cached HF copy of the default model equals a fresh dequantisation of the GGUF file."""
    loaded = load_model(f"gguf:{locate_default_gguf()}", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, default.model(ids).logits)
    assert loaded.tokenizer("Hello world")["input_ids"] == default.tokenizer("Hello world")["input_ids"]
