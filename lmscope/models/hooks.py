"""Uniform TransformerLens hook points on real Hugging Face modules.

:class:`HookedModel` wraps a ``transformers`` causal LM without converting its
weights. Hook names follow TransformerLens (``blocks.{i}.hook_resid_post`` and
friends); each is read at a *site* of :mod:`lmscope.models.architectures` with a
PyTorch forward (pre-)hook, or, for ``hook_pattern``, inside an attention function
registered with ``transformers`` that runs the model's own eager attention.

Shapes of hook values (``batch``, ``pos`` = sequence length):

==============================  ==================================
``hook_embed``, ``hook_pos_embed``, ``hook_resid_*``, ``hook_attn_out``, ``hook_mlp_out``, ``ln_final.hook_normalized``
                                ``[batch, pos, d_model]``
``mlp.hook_post``               ``[batch, pos, d_mlp]``
``attn.hook_z``                 ``[batch, pos, n_heads, d_head]``
``attn.hook_pattern``           ``[batch, n_heads, query_pos, key_pos]``
==============================  ==================================

A hook function is ``fn(value, name) -> Tensor | None``: returning a tensor replaces
the value (same shape), returning ``None`` leaves it as it is.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError
from lmscope.models.architectures import SUPPORTED_MODEL_TYPES, ArchitectureMap, Site, architecture_map

HookFn = Callable[[Tensor, str], Tensor | None]

_PATTERN_ATTENTION = "lmscope_eager"
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Order of hook points inside one decoder layer, as the forward pass reaches them.
_LAYER_ORDER = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


class _StopForward(Exception):
    """Raised inside a hook once every requested value is captured and logits are not needed."""


@dataclass(frozen=True)
class HookPoint:
    """A named hook point resolved to a module and a site kind.

    Attributes:
        name: the TransformerLens-style name.
        module: the Hugging Face module it is read at.
        kind: how it is read (see :mod:`lmscope.models.architectures`).
        layer: decoder layer index, or ``None`` outside the layers.
        order: position in forward order, for stopping early.
    """

    name: str
    module: nn.Module
    kind: str
    layer: int | None
    order: tuple[int, int]


def _get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _register_pattern_attention() -> None:
    """Register the attention function that exposes attention probabilities to hooks (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    if _PATTERN_ATTENTION in AttentionInterface._global_mapping:
        return
    AttentionInterface.register(_PATTERN_ATTENTION, _pattern_attention)
    AttentionMaskInterface.register(_PATTERN_ATTENTION, eager_mask)


def _pattern_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """The model's own eager attention, with ``hook_pattern`` callbacks between softmax and the value mix.

    Shapes: ``query [batch, n_heads, q, d_head]``, ``key``/``value [batch, n_kv_heads, k, d_head]``;
    returns ``(output [batch, q, n_heads, d_head], pattern [batch, n_heads, q, k])`` like every HF attention function.
    """
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, pattern = eager(module, query, key, value, attention_mask, **kwargs)
    callback = getattr(module, "_lmscope_pattern_hook", None)
    if callback is None:
        return output, pattern
    edited = callback(pattern)
    if edited is pattern:
        return output, pattern
    repeats = query.shape[1] // value.shape[1]
    values = value.repeat_interleave(repeats, dim=1) if repeats > 1 else value
    output = torch.matmul(edited.to(values.dtype), values).transpose(1, 2).contiguous()
    return output, edited


def _value_of(kind: str, module: nn.Module, args: tuple, kwargs: dict, output: Any = None) -> Tensor:
    if kind == "output":
        return output if isinstance(output, Tensor) else output[0]
    tensor = args[0] if args else kwargs["hidden_states"]
    if kind == "heads":
        n_heads = _n_heads(module)
        return tensor.view(*tensor.shape[:-1], n_heads, tensor.shape[-1] // n_heads)
    return tensor


def _n_heads(proj: nn.Module) -> int:
    return proj._lmscope_n_heads  # set by HookedModel on attention projections


class HookedModel:
    """A Hugging Face causal LM with TransformerLens hook points attached by forward hooks.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` of a supported architecture
            (``gpt_neox``, ``llama``, ``olmo``, ``olmo2``, ``gpt2``; also ``mistral``, ``qwen2``).
        tokenizer: its tokenizer, if any (used by :meth:`to_tokens`).
        spec: the model spec it was loaded from, recorded in results.
        source: the directory, file or hub id@revision the weights were read from.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, spec: str | None = None, source: str | None = None) -> None:
        try:
            self.arch: ArchitectureMap = architecture_map(model.config)
        except KeyError:
            raise LmscopeError(
                f"architecture {model.config.model_type!r} has no hook mapping yet; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (add an ArchitectureMap in lmscope/models/architectures.py)."
            ) from None
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.source = source
        self.config = model.config
        self.n_layers: int = len(_get_module(model, self.arch.layers))
        self.n_heads: int = model.config.num_attention_heads
        self._points: dict[str, HookPoint] = self._build_points()

    @classmethod
    def from_spec(
        cls, spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
    ) -> HookedModel:
        """Load a model spec (see :func:`lmscope.models.loading.load_model`) and attach hook points."""
        from lmscope.models.loading import load_model

        loaded = load_model(spec, dtype=dtype, device=device)
        return cls(loaded.model, loaded.tokenizer, spec=str(loaded.spec), source=loaded.source)

    # -- hook points -----------------------------------------------------------------

    def _build_points(self) -> dict[str, HookPoint]:
        arch, model = self.arch, self.model
        points: dict[str, HookPoint] = {}

        def add(name: str, path: str, kind: str, layer: int | None, order: tuple[int, int]) -> None:
            points[name] = HookPoint(name, _get_module(model, path), kind, layer, order)

        add("hook_embed", arch.embed, "output", None, (-1, 0))
        if arch.pos_embed is not None:
            add("hook_pos_embed", arch.pos_embed, "output", None, (-1, 1))
        for i in range(self.n_layers):
            layer = f"{arch.layers}.{i}"
            rank = {hook: k for k, hook in enumerate(_LAYER_ORDER)}
            sites: dict[str, Site | None] = {
                "hook_resid_pre": Site("", "input"),
                "attn.hook_pattern": Site(arch.attn, "pattern"),
                "attn.hook_z": Site(arch.attn_proj, "heads"),
                "hook_attn_out": arch.attn_out,
                "hook_resid_mid": arch.resid_mid,
                "mlp.hook_post": Site(arch.mlp_down, "input"),
                "hook_mlp_out": arch.mlp_out,
                "hook_resid_post": Site("", "output"),
            }
            for hook, site in sites.items():
                if site is None:
                    continue
                path = f"{layer}.{site.path}" if site.path else layer
                add(f"blocks.{i}.{hook}", path, site.kind, i, (i, rank[hook]))
            _get_module(model, f"{layer}.{arch.attn_proj}")._lmscope_n_heads = self.n_heads
        add("ln_final.hook_normalized", arch.final_norm, "output", None, (self.n_layers, 0))
        return points

    def hook_names(self) -> list[str]:
        """Every hook name of this model, in forward order."""
        return sorted(self._points, key=lambda name: self._points[name].order)

    def hook_point(self, name: str) -> HookPoint:
        """The :class:`HookPoint` called ``name``; an unknown name raises with the valid ones."""
        try:
            return self._points[name]
        except KeyError:
            raise LmscopeError(f"unknown hook {name!r}; valid hooks are {self._describe_names()}.") from None

    def _describe_names(self) -> str:
        last = self.n_layers - 1
        layer_hooks = [h for h in _LAYER_ORDER if f"blocks.0.{h}" in self._points]
        top = [n for n in self._points if not n.startswith("blocks.")]
        return ", ".join(top[:-1] + [f"blocks.{{0..{last}}}.{h}" for h in layer_hooks] + top[-1:])

    def hook_shapes(self) -> list[dict[str, Any]]:
        """Each hook's name, symbolic shape and sizes, read off a real forward pass on 4 tokens."""
        ids = torch.zeros((1, 4), dtype=torch.long, device=self.device)
        _, cache = self.run_with_cache(ids, self.hook_names(), need_logits=False)
        rows = []
        for name in self.hook_names():
            if name.endswith("hook_pattern"):
                dims = ["batch", "head", "query_pos", "key_pos"]
            elif name.endswith("hook_z"):
                dims = ["batch", "pos", "head", "d_head"]
            elif name.endswith("mlp.hook_post"):
                dims = ["batch", "pos", "d_mlp"]
            else:
                dims = ["batch", "pos", "d_model"]
            sizes = list(cache[name].shape)
            shape = [d if d in ("batch", "pos", "query_pos", "key_pos") else s for d, s in zip(dims, sizes)]
            rows.append({"name": name, "dims": dims, "shape": shape})
        return rows

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- running -----------------------------------------------------------------------

    @contextmanager
    def hooks(self, fns: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        """Attach ``(name, fn)`` hooks for the duration of the block; they run in the order given.

        Any forward call (``model(...)``, ``model.generate(...)``) inside the block sees them.
        """
        by_name: dict[str, list[HookFn]] = {}
        for name, fn in fns:
            self.hook_point(name)
            by_name.setdefault(name, []).append(fn)
        with ExitStack() as stack:
            if any(name.endswith("hook_pattern") for name in by_name):
                stack.enter_context(self._pattern_attention())
            for name, chain in by_name.items():
                stack.enter_context(self._attach(self._points[name], chain))
            yield

    @contextmanager
    def _pattern_attention(self) -> Iterator[None]:
        _register_pattern_attention()
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(_PATTERN_ATTENTION)
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    @contextmanager
    def _attach(self, point: HookPoint, chain: list[HookFn]) -> Iterator[None]:
        name, kind, module = point.name, point.kind, point.module

        def apply(value: Tensor) -> Tensor:
            for fn in chain:
                result = fn(value, name)
                if result is not None:
                    if result.shape != value.shape:
                        raise LmscopeError(
                            f"hook {name!r} returned shape {tuple(result.shape)} but its value has shape "
                            f"{tuple(value.shape)}; return a tensor of the same shape."
                        )
                    value = result
            return value

        if kind == "pattern":
            module._lmscope_pattern_hook = apply
            try:
                yield
            finally:
                del module._lmscope_pattern_hook
            return

        if kind == "output":

            def forward_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                value = _value_of(kind, mod, args, kwargs, output)
                new = apply(value)
                if new is value:
                    return None
                return new if isinstance(output, Tensor) else (new, *output[1:])

            handle = module.register_forward_hook(forward_hook, with_kwargs=True)
        else:

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                value = _value_of(kind, mod, args, kwargs)
                new = apply(value)
                if new is value:
                    return None
                if kind == "input_shared":
                    value.copy_(new)
                    return None
                if kind == "heads":
                    new = new.reshape(*new.shape[:-2], -1)
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def run_with_hooks(
        self, input_ids: Tensor, hooks: Sequence[tuple[str, HookFn]], attention_mask: Tensor | None = None
    ) -> Tensor:
        """Run with editing hooks; returns logits ``[batch, pos, vocab]``."""
        with self.hooks(hooks):
            return self._forward(input_ids, attention_mask)

    @torch.no_grad()
    def run_with_cache(
        self,
        input_ids: Tensor,
        names: Sequence[str],
        attention_mask: Tensor | None = None,
        need_logits: bool = True,
        hooks: Sequence[tuple[str, HookFn]] = (),
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run on ``input_ids [batch, pos]`` and return ``(logits | None, {name: value})``.

        With ``need_logits=False`` the forward pass stops right after the last
        requested hook fires, so layers after it are never computed. Editing
        ``hooks`` run before values are cached, so the cache shows edited values.
        """
        names = list(dict.fromkeys(names))
        for name in names:
            self.hook_point(name)
        cache: dict[str, Tensor] = {}
        remaining = set(names)

        def capture(value: Tensor, name: str) -> None:
            cache[name] = value.detach() if self.points_kind(name) != "input_shared" else value.detach().clone()
            remaining.discard(name)
            if not need_logits and not remaining:
                raise _StopForward

        logits = None
        try:
            with self.hooks([*hooks, *((name, capture) for name in names)]):
                logits = self._forward(input_ids, attention_mask)
        except _StopForward:
            pass
        return (logits if need_logits else None), cache

    def points_kind(self, name: str) -> str:
        return self._points[name].kind

    def to_tokens(self, text: str | list[str], prepend_bos: bool = False) -> Tensor:
        """Tokenize text into ``input_ids [batch, pos]`` with the model's tokenizer (no padding for one text)."""
        if self.tokenizer is None:
            raise LmscopeError(f"model {self.spec!r} has no tokenizer; pass token ids instead of text.")
        texts = [text] if isinstance(text, str) else text
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and self.tokenizer.bos_token_id is not None:
            ids = [[self.tokenizer.bos_token_id, *row] for row in ids]
        if len({len(row) for row in ids}) != 1:
            raise LmscopeError("texts of different token lengths need padding; tokenize them yourself with an attention mask.")
        return torch.tensor(ids, dtype=torch.long)


def zero_ablate(value: Tensor, name: str) -> Tensor:
    """Hook function: replace the value with zeros."""
    return torch.zeros_like(value)


def replace_with(new: Tensor) -> HookFn:
    """Hook function factory: replace the value with ``new`` (broadcast to its shape)."""

    def fn(value: Tensor, name: str) -> Tensor:
        return new.to(value.dtype).to(value.device).expand_as(value).clone()

    return fn


def add_to(delta: Tensor) -> HookFn:
    """Hook function factory: add ``delta`` (broadcast) to the value, e.g. a steering vector."""

    def fn(value: Tensor, name: str) -> Tensor:
        return value + delta.to(value.dtype).to(value.device)

    return fn


def mean_ablate(mean: Tensor) -> HookFn:
    """Hook function factory: replace every position's value with ``mean`` (e.g. a dataset mean ``[d]``)."""
    return replace_with(mean)
