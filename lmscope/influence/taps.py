r"""The linear layers influence is computed over, and hooks that record what their gradients are made of.

For a linear layer :math:`y = W a + b` applied at every token, the gradient of a loss summed over
the tokens of one sequence is

.. math::  \nabla_{[W\,b]} L = \sum_t g_t \, \bar a_t^\top, \qquad \bar a_t = [a_t; 1],\; g_t = \partial L / \partial y_t

so a layer's per-sequence gradient (``[d_out, d_in + 1]``, the bias as the last column, the layout
kronfluence uses) is fully determined by the layer's inputs and the gradients at its outputs.
:class:`LinearTaps` records both in one forward and backward pass over a batch; nothing of size
``d_out × d_in`` per sequence is materialised unless asked for (:meth:`LinearTaps.per_sequence_gradients`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError

ModuleSelection = Literal["blocks", "mlp", "attention", "all"]
MODULE_SELECTIONS: tuple[str, ...] = ("blocks", "mlp", "attention", "all")


def tracked_linears(model: nn.Module, selection: str = "blocks") -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that influence is computed over, by module path, in model order.

    Args:
        model: a ``transformers`` causal LM.
        selection: ``blocks`` — every linear layer inside the decoder layers (attention and MLP; the
            embedding and unembedding are left out, as in kronfluence's language-model examples);
            ``mlp`` — the MLP's linear layers only (Grosse et al. 2023's main setting);
            ``attention`` — the attention's linear layers only; ``all`` — every ``nn.Linear``,
            the unembedding included.
    """
    from lmscope.models.architectures import architecture_map

    if selection not in MODULE_SELECTIONS:
        raise LmscopeError(f"module selection {selection!r} is unknown; choose one of {', '.join(MODULE_SELECTIONS)}.")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if selection == "all":
        chosen = linears
    else:
        arch = architecture_map(model.config)
        prefix = _full_path(model, arch.layers) + "."
        chosen = {}
        for name, module in linears.items():
            if not name.startswith(prefix):
                continue
            inner = name[len(prefix):].split(".", 1)[1] if "." in name[len(prefix):] else ""
            in_mlp = inner.startswith(_parent(arch.mlp_down) + ".") if _parent(arch.mlp_down) else False
            in_attn = inner.startswith(arch.attn + ".")
            if selection == "blocks" or (selection == "mlp" and in_mlp) or (selection == "attention" and in_attn):
                chosen[name] = module
    if not chosen:
        raise LmscopeError(f"the model has no linear layers in the selection {selection!r}; choose one of {', '.join(MODULE_SELECTIONS)}.")
    return chosen


def _full_path(model: nn.Module, path: str) -> str:
    """``path`` (relative to the causal LM) as ``named_modules`` spells it."""
    names = dict(model.named_modules())
    if path not in names:
        raise LmscopeError(f"module path {path!r} is not in this {type(model).__name__}.")
    return path


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def with_bias_column(activation: Tensor, has_bias: bool) -> Tensor:
    """``[..., d_in]`` → ``[..., d_in + 1]`` with a column of ones appended when the layer has a bias."""
    if not has_bias:
        return activation
    return torch.cat([activation, activation.new_ones(*activation.shape[:-1], 1)], dim=-1)


class LinearTaps:
    """Records, for each tracked layer, its input ``[B, T, d_in(+1)]`` and output gradient ``[B, T, d_out]``.

    Use as a context manager around one forward and backward pass of a batch::

        with LinearTaps(modules) as taps:
            loss = objective(model, batch).sum()
            loss.backward()
        taps.activations[name], taps.output_grads[name]

    The backward pass must be of a loss that is a *sum* over sequences (not a mean), so that each
    sequence's gradients are its own. A layer called twice in one forward (shared weights) is refused.
    """

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype = torch.float32) -> None:
        self.modules = modules
        self.dtype = dtype
        self.activations: dict[str, Tensor] = {}
        self.output_grads: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LinearTaps":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.activations.clear()
        self.output_grads.clear()

    def _forward_hook(self, name: str):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if name in self.activations:
                raise LmscopeError(f"layer {name!r} ran twice in one forward pass (shared weights); influence over shared layers is not supported.")
            activation = inputs[0].detach().to(self.dtype)
            self.activations[name] = with_bias_column(activation, module.bias is not None)
            if output.requires_grad:
                output.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):  # noqa: ANN202 - a torch hook
        def hook(grad: Tensor) -> None:
            self.output_grads[name] = grad.detach().to(self.dtype)

        return hook

    def check_complete(self) -> None:
        missing = [name for name in self.modules if name not in self.output_grads]
        if missing:
            raise LmscopeError(f"no gradient reached layer(s) {', '.join(missing[:3])}; they do not affect the loss, leave them out of the selection.")

    def per_sequence_gradients(self, name: str) -> Tensor:
        """``[B, d_out, d_in(+1)]``: each sequence's gradient of layer ``name``'s weight (and bias, last column)."""
        return torch.einsum("bto,bti->boi", self.output_grads[name], self.activations[name])
