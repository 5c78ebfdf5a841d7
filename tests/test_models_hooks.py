"""Hook points against Hugging Face's own outputs, for every supported architecture on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.models.hooks import HookedModel, add_to, zero_ablate
from tiny_models import TINY_ARCHITECTURES, tiny_inputs, tiny_model

ARCHS = list(TINY_ARCHITECTURES)


def _non_pattern(hooked: HookedModel) -> list[str]:
    return [name for name in hooked.hook_names() if not name.endswith("hook_pattern")]


@pytest.mark.parametrize("label", ARCHS)
def test_attaching_hooks_leaves_logits_bitwise_equal(label: str) -> None:
    for attn in ("sdpa", "eager"):
        model = tiny_model(label, attn)
        hooked = HookedModel(model)
        ids = tiny_inputs()
        reference = model(ids).logits
        names = hooked.hook_names() if attn == "eager" else _non_pattern(hooked)
        logits, cache = hooked.run_with_cache(ids, names)
        assert torch.equal(logits, reference), f"{label}/{attn}: hooks changed the logits"
        assert set(cache) == set(names)
        assert model.config._attn_implementation == attn, "the attention implementation was not restored"


@pytest.mark.parametrize("label", ARCHS)
def test_resid_post_matches_output_hidden_states(label: str) -> None:
    model = tiny_model(label)
    hooked = HookedModel(model)
    ids = tiny_inputs()
    out = model(ids, output_hidden_states=True)
    _, cache = hooked.run_with_cache(ids, _non_pattern(hooked))
    n = hooked.n_layers
    assert len(out.hidden_states) == n + 1
    assert (cache["blocks.0.hook_resid_pre"] - out.hidden_states[0]).abs().max() <= 1e-6
    for i in range(n - 1):
        diff = (cache[f"blocks.{i}.hook_resid_post"] - out.hidden_states[i + 1]).abs().max()
        assert diff <= 1e-6, f"{label} layer {i}: {diff}"
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])
    # Hugging Face reports the last hidden state after the final norm.
    final_norm = model.get_submodule(hooked.arch.final_norm)
    assert (final_norm(cache[f"blocks.{n - 1}.hook_resid_post"]) - out.hidden_states[n]).abs().max() <= 1e-6
    assert (cache["ln_final.hook_normalized"] - out.hidden_states[n]).abs().max() <= 1e-6


@pytest.mark.parametrize("label", ARCHS)
def test_residual_stream_adds_up(label: str) -> None:
    model = tiny_model(label)
    hooked = HookedModel(model)
    _, cache = hooked.run_with_cache(tiny_inputs(), _non_pattern(hooked))
    for i in range(hooked.n_layers):
        pre, post = cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_resid_post"]
        attn, mlp = cache[f"blocks.{i}.hook_attn_out"], cache[f"blocks.{i}.hook_mlp_out"]
        assert (pre + attn + mlp - post).abs().max() <= 1e-5
        mid = f"blocks.{i}.hook_resid_mid"
        if mid in cache:
            assert (pre + attn - cache[mid]).abs().max() <= 1e-6
            assert (cache[mid] + mlp - post).abs().max() <= 1e-6
    if label == "gpt_neox":
        assert "blocks.0.hook_resid_mid" not in hooked.hook_names(), "parallel residual has no resid_mid"


@pytest.mark.parametrize("label", ARCHS)
def test_z_and_neurons_reproduce_block_outputs(label: str) -> None:
    """Projecting hook_z through the attention output projection gives the attention output; the same for neurons."""
    model = tiny_model(label)
    hooked = HookedModel(model)
    _, cache = hooked.run_with_cache(tiny_inputs(), _non_pattern(hooked))
    layer = model.get_submodule(f"{hooked.arch.layers}.1")
    z = cache["blocks.1.attn.hook_z"]
    assert z.shape[-2:] == (hooked.n_heads, model.config.hidden_size // hooked.n_heads)
    projected = layer.get_submodule(hooked.arch.attn_proj)(z.flatten(-2))
    attn_site = hooked.arch.attn_out
    if attn_site.path != hooked.arch.attn:  # OLMo-2 normalises the attention output first
        projected = layer.get_submodule(attn_site.path)(projected)
    assert (projected - cache["blocks.1.hook_attn_out"]).abs().max() <= 1e-6
    neurons = cache["blocks.1.mlp.hook_post"]
    down = layer.get_submodule(hooked.arch.mlp_down)(neurons)
    if hooked.arch.mlp_out.path != "mlp":
        down = layer.get_submodule(hooked.arch.mlp_out.path)(down)
    assert (down - cache["blocks.1.hook_mlp_out"]).abs().max() <= 1e-6


@pytest.mark.parametrize("label", ARCHS)
def test_attention_pattern_matches_output_attentions(label: str) -> None:
    model = tiny_model(label, "sdpa")
    hooked = HookedModel(model)
    ids = tiny_inputs()
    _, cache = hooked.run_with_cache(ids, [f"blocks.{i}.attn.hook_pattern" for i in range(hooked.n_layers)])
    eager = tiny_model(label, "eager")
    out = eager(ids, output_attentions=True)
    for i in range(hooked.n_layers):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (2, hooked.n_heads, ids.shape[1], ids.shape[1])
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-6)
        assert torch.triu(pattern, diagonal=1).abs().max() == 0, "attention must be causal"
        assert torch.equal(pattern, out.attentions[i])


@pytest.mark.parametrize("label", ARCHS)
def test_identity_edits_leave_logits_unchanged_and_ablation_changes_them(label: str) -> None:
    model = tiny_model(label, "eager")
    hooked = HookedModel(model)
    ids = tiny_inputs()
    reference = model(ids).logits
    identity = [(name, lambda value, name: value.clone()) for name in hooked.hook_names()]
    assert torch.equal(hooked.run_with_hooks(ids, identity), reference)
    ablated = hooked.run_with_hooks(ids, [("blocks.1.hook_mlp_out", zero_ablate)])
    assert (ablated - reference).abs().max() > 1e-3


@pytest.mark.parametrize("label", ARCHS)
def test_every_hook_fires_and_every_edit_takes_effect(label: str) -> None:
    """Anti-tautology: each hook is called exactly once per forward, and editing it changes the logits."""
    model = tiny_model(label, "eager")
    hooked = HookedModel(model)
    ids = tiny_inputs()
    calls: dict[str, int] = {}

    def count(value: torch.Tensor, name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    reference = hooked.run_with_hooks(ids, [(name, count) for name in hooked.hook_names()])
    _, reference_cache = hooked.run_with_cache(ids, hooked.hook_names())
    assert calls == {name: 1 for name in hooked.hook_names()}
    for name in hooked.hook_names():
        if name.endswith("hook_pattern"):
            def edit(value: torch.Tensor, name: str) -> torch.Tensor:
                # all attention on the first token: far from a random model's near-uniform pattern
                first = torch.zeros_like(value)
                first[..., 0] = 1.0
                return first
        else:
            # a random direction: a constant shift would vanish in the next LayerNorm
            edit = add_to(torch.randn(reference_cache[name].shape[-1], generator=torch.Generator().manual_seed(0)))
        edited = hooked.run_with_hooks(ids, [(name, edit)])
        assert (edited - reference).abs().max() > 1e-4, f"editing {name} did not change the logits"
    assert torch.equal(hooked.run_with_hooks(ids, []), reference), "hooks were left attached"


@pytest.mark.parametrize("label", ["gpt_neox", "llama"])
def test_cache_without_logits_stops_after_the_last_needed_layer(label: str) -> None:
    model = tiny_model(label)
    hooked = HookedModel(model)
    ids = tiny_inputs()
    later_calls = []
    last_layer = model.get_submodule(f"{hooked.arch.layers}.2")
    handle = last_layer.register_forward_hook(lambda *args: later_calls.append(1))
    try:
        logits, cache = hooked.run_with_cache(ids, ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"], need_logits=False)
    finally:
        handle.remove()
    assert logits is None and later_calls == []
    full_logits, full = hooked.run_with_cache(ids, ["blocks.1.hook_attn_out"])
    assert torch.equal(cache["blocks.1.hook_attn_out"], full["blocks.1.hook_attn_out"])


def test_edited_value_is_what_the_cache_shows() -> None:
    hooked = HookedModel(tiny_model("llama"))
    _, cache = hooked.run_with_cache(tiny_inputs(), ["blocks.0.hook_resid_mid"], hooks=[("blocks.0.hook_resid_mid", zero_ablate)])
    assert cache["blocks.0.hook_resid_mid"].abs().max() == 0


def test_hook_shapes_are_symbolic_where_they_vary() -> None:
    hooked = HookedModel(tiny_model("llama"))
    shapes = {row["name"]: row["shape"] for row in hooked.hook_shapes()}
    assert shapes["blocks.0.hook_resid_post"] == ["batch", "pos", 32]
    assert shapes["blocks.0.attn.hook_z"] == ["batch", "pos", 4, 8]
    assert shapes["blocks.0.attn.hook_pattern"] == ["batch", 4, "query_pos", "key_pos"]
    assert shapes["blocks.0.mlp.hook_post"] == ["batch", "pos", 64]


def test_unknown_hook_names_the_valid_ones() -> None:
    hooked = HookedModel(tiny_model("gpt_neox"))
    with pytest.raises(LmscopeError, match=r"unknown hook 'blocks\.0\.hook_resid_mid'.*blocks\.\{0\.\.2\}\.hook_resid_pre"):
        hooked.run_with_cache(tiny_inputs(), ["blocks.0.hook_resid_mid"])


def test_edit_of_the_wrong_shape_is_refused() -> None:
    hooked = HookedModel(tiny_model("gpt2"))
    with pytest.raises(LmscopeError, match="returned shape"):
        hooked.run_with_hooks(tiny_inputs(), [("blocks.0.hook_mlp_out", lambda value, name: value[:, :1])])


def test_unsupported_architecture_is_named() -> None:
    import transformers

    config = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    with pytest.raises(LmscopeError, match="'bloom' has no hook mapping"):
        HookedModel(transformers.BloomForCausalLM(config))
