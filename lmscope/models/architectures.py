"""Where each TransformerLens hook name lives inside a Hugging Face architecture.

A hook point is read (and edited) at one of these *sites* on a real module:

- ``output``: the module's output (first element when it returns a tuple);
- ``input``: the module's first positional input (or ``hidden_states`` keyword);
- ``input_shared``: like ``input``, but the same tensor is also kept by the caller
  as the residual stream, so an edit is made in place to reach both uses;
- ``heads``: the input of the attention output projection, viewed per head;
- ``pattern``: the attention probabilities inside the attention function.

Adding an architecture that Hugging Face runs is one more :class:`ArchitectureMap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SiteKind = Literal["output", "input", "input_shared", "heads", "pattern"]


@dataclass(frozen=True)
class Site:
    """A module path relative to the causal LM (``{layer}`` is the decoder layer's path) and how to read it."""

    path: str
    kind: SiteKind


@dataclass(frozen=True)
class ArchitectureMap:
    """Module paths of one architecture, keyed by the hook they provide.

    Attributes:
        embed: the token embedding (``hook_embed``).
        pos_embed: the learned position embedding (``hook_pos_embed``), if any.
        layers: the ``ModuleList`` of decoder layers.
        attn: the attention module, relative to a layer (``hook_pattern`` and ``hook_z`` live inside).
        attn_out: what the attention block adds to the residual stream.
        mlp_out: what the MLP block adds to the residual stream.
        attn_proj: the attention output projection (``hook_z`` is its input).
        mlp_down: the MLP down projection (``mlp.hook_post`` is its input).
        resid_mid: the residual stream between attention and MLP; ``None`` for
            parallel-residual layers, where no such tensor exists.
        final_norm: the final norm (``ln_final.hook_normalized`` is its output).
    """

    embed: str
    layers: str
    attn: str
    attn_out: Site
    mlp_out: Site
    attn_proj: str
    mlp_down: str
    resid_mid: Site | None
    final_norm: str
    pos_embed: str | None = None


_LLAMA_LIKE = ArchitectureMap(
    embed="model.embed_tokens",
    layers="model.layers",
    attn="self_attn",
    attn_out=Site("self_attn", "output"),
    mlp_out=Site("mlp", "output"),
    attn_proj="self_attn.o_proj",
    mlp_down="mlp.down_proj",
    resid_mid=Site("post_attention_layernorm", "input_shared"),
    final_norm="model.norm",
)

# OLMo-2 normalises each block's *output* before adding it to the residual stream.
_OLMO2 = ArchitectureMap(
    embed="model.embed_tokens",
    layers="model.layers",
    attn="self_attn",
    attn_out=Site("post_attention_layernorm", "output"),
    mlp_out=Site("post_feedforward_layernorm", "output"),
    attn_proj="self_attn.o_proj",
    mlp_down="mlp.down_proj",
    resid_mid=Site("mlp", "input_shared"),
    final_norm="model.norm",
)

_GPT_NEOX_SEQUENTIAL = ArchitectureMap(
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    attn="attention",
    attn_out=Site("attention", "output"),
    mlp_out=Site("mlp", "output"),
    attn_proj="attention.dense",
    mlp_down="mlp.dense_4h_to_h",
    resid_mid=Site("post_attention_layernorm", "input_shared"),
    final_norm="gpt_neox.final_layer_norm",
)

# Pythia: x + attn(ln1(x)) + mlp(ln2(x)); there is no residual stream between the blocks.
_GPT_NEOX_PARALLEL = ArchitectureMap(**{**_GPT_NEOX_SEQUENTIAL.__dict__, "resid_mid": None})

_GPT2 = ArchitectureMap(
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    layers="transformer.h",
    attn="attn",
    attn_out=Site("attn", "output"),
    mlp_out=Site("mlp", "output"),
    attn_proj="attn.c_proj",
    mlp_down="mlp.c_proj",
    resid_mid=Site("ln_2", "input_shared"),
    final_norm="transformer.ln_f",
)

SUPPORTED_MODEL_TYPES = ("gpt_neox", "llama", "olmo", "olmo2", "gpt2", "mistral", "qwen2")


def architecture_map(config: object) -> ArchitectureMap:
    """The :class:`ArchitectureMap` for a ``transformers`` config, or ``KeyError`` if unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt_neox":
        return _GPT_NEOX_PARALLEL if getattr(config, "use_parallel_residual", True) else _GPT_NEOX_SEQUENTIAL
    if model_type in ("llama", "olmo", "mistral", "qwen2"):
        return _LLAMA_LIKE
    if model_type == "olmo2":
        return _OLMO2
    if model_type == "gpt2":
        return _GPT2
    raise KeyError(model_type)
