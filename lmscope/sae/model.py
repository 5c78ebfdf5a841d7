r"""Sparse autoencoders (and transcoders): one module, four activation functions.

With input :math:`x \in \mathbb{R}^{d_{in}}` (one token's activation at ``hook``)::

    pre   = (x - b_dec·[not transcoder]) @ W_enc + b_enc          [N, width]
    f     = activation(pre)                                        [N, width]   feature activations
    x_hat = f @ W_dec + b_dec                                      [N, d_out]   reconstruction

``W_enc [d_in, width]``, ``b_enc [width]``, ``W_dec [width, d_out]``, ``b_dec [d_out]``; a
transcoder reads ``hook`` and reconstructs ``out_hook`` (``d_out`` may differ from ``d_in``) and
subtracts nothing from its input. The activations:

- ``relu`` (Towards Monosemanticity): :math:`f = \mathrm{ReLU}(pre)`; trained with an L1 penalty
  weighted by decoder row norms.
- ``topk`` (Gao et al. 2024): the ``k`` largest pre-activations of each row, ReLU'd; all others 0.
- ``batchtopk`` (Bussmann et al. 2024): in training, the ``k·N`` largest pre-activations of the
  whole batch (ReLU'd); at inference a JumpReLU with one global threshold (``threshold``,
  estimated during training), so a token's L0 no longer depends on its batch.
- ``jumprelu`` (Rajamanoharan et al. 2024): :math:`f = pre \cdot H(pre - \theta)` with a learned
  threshold :math:`\theta = e^{\text{log\_threshold}}` per feature; trained through
  straight-through estimators (:mod:`lmscope.sae.losses`).

The module holds weights for *normalised* inputs: ``input_scale`` and ``output_scale`` multiply
``x`` and the target during training (see :func:`fold_scales`, which returns the equivalent SAE
on raw activations, as exported).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmscope.errors import LmscopeError

Arch = Literal["relu", "topk", "batchtopk", "jumprelu"]
ARCHS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class SaeShape:
    """What an SAE is: sizes, activation, and the hooks it reads and writes. Saved with the weights."""

    d_in: int
    width: int
    arch: Arch = "topk"
    k: int | None = None
    """Active features per token (``topk``) or on average per token (``batchtopk``)."""
    hook: str = ""
    """Hook whose activations are encoded."""
    out_hook: str | None = None
    """Transcoder: the hook reconstructed (``None``: an ordinary SAE reconstructing ``hook``)."""
    d_out: int | None = None
    """Width of ``out_hook`` (``None``: ``d_in``)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise LmscopeError(f"SAE architecture {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
        if self.d_in < 1 or self.width < 1 or (self.d_out is not None and self.d_out < 1):
            raise LmscopeError(f"SAE sizes d_in={self.d_in}, width={self.width}, d_out={self.d_out} must be positive.")
        if self.arch in ("topk", "batchtopk"):
            if self.k is None or not 1 <= self.k <= self.width:
                raise LmscopeError(f"a {self.arch} SAE needs k between 1 and its width {self.width}; got k={self.k}.")
        elif self.k is not None:
            raise LmscopeError(f"k is set ({self.k}) but a {self.arch} SAE has no k; leave it out or use arch topk.")
        if self.out_hook is None and self.d_out not in (None, self.d_in):
            raise LmscopeError(f"d_out={self.d_out} differs from d_in={self.d_in} but out_hook is not set; "
                               "a different output width needs a transcoder (set out_hook).")

    @property
    def transcoder(self) -> bool:
        return self.out_hook is not None

    @property
    def output_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder or transcoder (see the module docstring for the maths and shapes)."""

    def __init__(self, shape: SaeShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.shape = shape
        generator = torch.Generator().manual_seed(seed)
        d_in, width, d_out = shape.d_in, shape.width, shape.output_dim
        # Decoder rows start as random unit vectors, the encoder as their transpose (Gao et al., Conerly et al.).
        w_dec = torch.randn(width, d_out, generator=generator, dtype=torch.float64)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        w_enc = w_dec.T.clone() if d_in == d_out else torch.randn(d_in, width, generator=generator, dtype=torch.float64) / d_in**0.5
        self.W_enc = nn.Parameter(w_enc.to(dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(width, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(w_dec.to(dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        # JumpReLU: learned per feature; BatchTopK: one value for all, estimated in training (a buffer).
        initial = torch.full((width,), 1e-3, dtype=dtype, device=device)
        if shape.arch == "jumprelu":
            self.log_threshold = nn.Parameter(initial.log())
        else:
            self.register_buffer("log_threshold", torch.full((width,), float("-inf"), dtype=dtype, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=dtype, device=device))
        self.register_buffer("output_scale", torch.ones((), dtype=dtype, device=device))

    @property
    def threshold(self) -> Tensor:
        """``[width]``: the JumpReLU threshold (``batchtopk``: the inference threshold; 0 before it is estimated)."""
        return self.log_threshold.exp()

    def pre_acts(self, x: Tensor) -> Tensor:
        """``[N, d_in]`` (normalised) → ``[N, width]`` pre-activations."""
        if x.shape[-1] != self.shape.d_in:
            raise LmscopeError(f"input of width {x.shape[-1]} given to an SAE of d_in {self.shape.d_in}; "
                               f"pass activations of hook {self.shape.hook or '?'}.")
        centred = x if self.shape.transcoder else x - self.b_dec
        return centred @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor, *, batch_topk: bool = False) -> Tensor:
        """Feature activations ``[N, width]`` from pre-activations.

        ``batch_topk=True`` (training a ``batchtopk`` SAE) keeps the ``k·N`` largest values of the
        batch; otherwise ``batchtopk`` uses its global threshold, like a JumpReLU.
        """
        arch = self.shape.arch
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            values, indices = pre.topk(self.shape.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        if arch == "batchtopk" and batch_topk:
            flat = pre.reshape(-1)
            values, indices = flat.topk(min(self.shape.k * pre.shape[0], flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter_(-1, indices, torch.relu(values)).reshape(pre.shape)
        return pre * (pre > self.threshold)  # jumprelu, and batchtopk at inference

    def encode(self, x: Tensor) -> Tensor:
        """``[N, d_in]`` → feature activations ``[N, width]`` (inference: ``batchtopk`` uses its threshold)."""
        return self.activate(self.pre_acts(x))

    def decode(self, features: Tensor) -> Tensor:
        """``[N, width]`` → reconstruction ``[N, d_out]``."""
        return features @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (a transcoder: its prediction of ``out_hook``), ``[N, d_out]``."""
        return self.decode(self.encode(x))

    def forward_raw(self, x: Tensor) -> Tensor:
        """Reconstruction of *raw* (unnormalised) activations: scales in, decodes, scales back out."""
        return self.forward(x * self.input_scale) / self.output_scale

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm (the encoder is left as it is)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def fold_scales(sae: SparseAutoencoder) -> SparseAutoencoder:
    r"""The same SAE on raw activations, with ``input_scale = output_scale = 1``.

    With input scale :math:`s` and output scale :math:`t`, the trained SAE computes
    :math:`\hat y = (f((s x - b_{dec}) W_{enc} + b_{enc}) W_{dec} + b_{dec}) / t`. Writing
    :math:`W_{enc}' = s W_{enc}`, :math:`W_{dec}' = W_{dec} / t`, :math:`b_{dec}' = b_{dec} / t`
    (and, for an SAE, :math:`s = t`, so :math:`b_{dec}/s` is also the input centring) gives the same
    :math:`\hat y` and the same feature activations from raw :math:`x`. Thresholds are unchanged.
    """
    s, t = float(sae.input_scale), float(sae.output_scale)
    if not sae.shape.transcoder and s != t:
        raise LmscopeError(f"an SAE must scale input and output alike (input {s}, output {t}); retrain it.")
    folded = SparseAutoencoder(sae.shape, dtype=sae.W_enc.dtype, device=sae.W_enc.device)
    folded.load_state_dict(sae.state_dict())
    folded.W_enc.mul_(s)
    folded.W_dec.div_(t)
    folded.b_dec.div_(t)
    folded.input_scale.fill_(1.0)
    folded.output_scale.fill_(1.0)
    return folded
