r"""Logit lens: read each layer's residual stream through the final norm and the unembedding.

For layer :math:`\ell` with residual stream :math:`h_\ell` (``blocks.ℓ.hook_resid_post``),
the lens distribution is :math:`q_\ell = \mathrm{softmax}(W_U\,\mathrm{norm}(h_\ell))`, using the
model's own final norm and output embedding. Reported per layer, averaged over every
scored position:

- ``lens_cross_entropy``: :math:`-\log q_\ell(t_{i+1})` in nats (how well the layer already predicts the next token);
- ``lens_kl``: :math:`\mathrm{KL}(p \,\|\, q_\ell)` in nats, with :math:`p` the model's final distribution.

The last layer's lens *is* the model's output, so its KL is 0 and its cross-entropy is the
model's loss (a built-in check). Contexts are the first ``ctx`` tokens of held-out
documents at least that long, in corpus order (:func:`lens_contexts`). The tuned lens, an
affine translator trained per layer, is :mod:`lmscope.evals.tuned_lens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from lmscope.errors import LmscopeError


@dataclass
class LensLayer:
    """Logit-lens figures of one layer: mean cross-entropy and KL to the final distribution, in nats."""

    layer: int
    cross_entropy: float
    kl: float
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lens_contexts(corpus: Any, *, split: str, ctx: int, n_contexts: int) -> list[np.ndarray]:
    """The first ``ctx`` tokens (int64, shape ``(ctx,)``) of up to ``n_contexts`` ``split`` documents at least that long, in corpus order."""
    contexts = []
    for doc in corpus.select(split=split).tolist():
        tokens = corpus.document_tokens(doc)
        if len(tokens) >= ctx:
            contexts.append(np.asarray(tokens[:ctx], dtype=np.int64))
            if len(contexts) == n_contexts:
                break
    if not contexts:
        raise LmscopeError(f"no {split} document has {ctx} tokens; pass a smaller ctx.")
    return contexts


@torch.no_grad()
def logit_lens(
    hooked: Any, corpus: Any, *, ctx: int = 64, n_contexts: int = 16, batch_size: int = 4, split: str = "heldout",
    translate: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> list[LensLayer]:
    """Logit-lens cross-entropy and KL per layer of a :class:`~lmscope.models.hooks.HookedModel`.

    ``translate(hidden, layer)`` maps each layer's residual stream before it is read (the tuned
    lens's translators); ``None`` reads it as it is.
    """
    if ctx < 2 or n_contexts < 1 or batch_size < 1:
        raise LmscopeError(f"ctx={ctx}, n_contexts={n_contexts}, batch_size={batch_size}: need ctx >= 2 and positive counts.")
    contexts = lens_contexts(corpus, split=split, ctx=ctx, n_contexts=n_contexts)
    model = hooked.model
    final_norm = model.get_submodule(hooked.arch.final_norm)
    unembed = model.get_output_embeddings()
    names = [f"blocks.{i}.hook_resid_post" for i in range(hooked.n_layers)]
    ce = np.zeros(hooked.n_layers)
    kl = np.zeros(hooked.n_layers)
    count = 0
    for start in range(0, len(contexts), batch_size):
        ids = torch.from_numpy(np.stack(contexts[start : start + batch_size])).to(hooked.device)
        logits, cache = hooked.run_with_cache(ids, names)
        final = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        targets = ids[:, 1:]
        for i, name in enumerate(names):
            hidden = cache[name] if translate is None else translate(cache[name], i)
            lens = torch.log_softmax(unembed(final_norm(hidden))[:, :-1].double(), dim=-1)
            ce[i] -= lens.gather(-1, targets.unsqueeze(-1)).sum().item()
            kl[i] += (final.exp() * (final - lens)).sum().item()
        count += targets.numel()
    return [LensLayer(i, ce[i] / count, kl[i] / count, count) for i in range(hooked.n_layers)]


def result_rows(layers: list[LensLayer], **identity: Any) -> list[dict[str, Any]]:
    """Rows of the results schema: ``lens_cross_entropy`` and ``lens_kl`` per layer (extra column ``layer``)."""
    rows = []
    for layer in layers:
        for metric, value in (("lens_cross_entropy", layer.cross_entropy), ("lens_kl", layer.kl)):
            rows.append({**identity, "metric": metric, "domain": "all", "value": value, "layer": layer.layer,
                         "lens": "logit", "positions": layer.positions})
    return rows
