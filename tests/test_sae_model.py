"""The SAE module against hand computations: activations, sparsity, and folding the input normalisation."""

from __future__ import annotations

import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.sae.model import SaeShape, SparseAutoencoder, fold_scales


def _x(n: int = 64, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3


def test_relu_sae_is_the_formula() -> None:
    sae = SparseAutoencoder(SaeShape(d_in=16, width=40, arch="relu"), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = _x()
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.equal(sae.encode(x), f)
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))


def test_topk_keeps_exactly_the_k_largest_per_row() -> None:
    sae = SparseAutoencoder(SaeShape(d_in=16, width=40, arch="topk", k=5), seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive, so L0 is exactly k
    x = _x()
    f = sae.encode(x)
    pre = sae.pre_acts(x)
    assert ((f != 0).sum(-1) == 5).all()
    for row in range(x.shape[0]):
        top = set(pre[row].argsort(descending=True)[:5].tolist())
        assert set(f[row].nonzero().flatten().tolist()) == top
        assert torch.equal(f[row][list(top)], pre[row][list(top)])


def test_batchtopk_keeps_k_times_n_in_training_and_thresholds_at_inference() -> None:
    sae = SparseAutoencoder(SaeShape(d_in=16, width=40, arch="batchtopk", k=4), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)
    x = _x(n=10)
    pre = sae.pre_acts(x)
    f = sae.activate(pre, batch_topk=True)
    assert int((f != 0).sum()) == 40
    assert f[f != 0].min() >= pre.flatten().sort(descending=True).values[39]
    with torch.no_grad():
        sae.log_threshold.fill_(float(pre.median().log()))
    inference = sae.encode(x)
    assert torch.equal(inference, pre * (pre > sae.threshold)) and 0 < int((inference != 0).sum()) < pre.numel()


def test_jumprelu_zeroes_below_its_per_feature_threshold() -> None:
    sae = SparseAutoencoder(SaeShape(d_in=16, width=40, arch="jumprelu"), seed=4)
    theta = torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.1
    with torch.no_grad():
        sae.log_threshold.copy_(theta.log())
    x = _x()
    pre = sae.pre_acts(x)
    assert torch.allclose(sae.encode(x), torch.where(pre > theta, pre, torch.zeros_like(pre)))
    assert isinstance(sae.log_threshold, torch.nn.Parameter)


@pytest.mark.parametrize("transcoder", [False, True])
def test_folding_the_scales_gives_the_same_features_and_output_on_raw_inputs(transcoder: bool) -> None:
    shape = SaeShape(d_in=16, width=40, arch="topk", k=6, out_hook="blocks.0.hook_mlp_out" if transcoder else None,
                     d_out=12 if transcoder else None)
    sae = SparseAutoencoder(shape, seed=5).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.input_scale.fill_(0.37)
        sae.output_scale.fill_(2.5 if transcoder else 0.37)
    x = _x().double()
    folded = fold_scales(sae)
    assert torch.allclose(folded(x), sae.forward_raw(x), atol=1e-10)
    assert torch.allclose(folded.encode(x), sae.encode(x * 0.37), atol=1e-10)
    assert float(folded.input_scale) == float(folded.output_scale) == 1.0


def test_bad_shapes_and_inputs_are_refused() -> None:
    with pytest.raises(LmscopeError, match="unknown; choose one of"):
        SaeShape(d_in=4, width=8, arch="gated")
    with pytest.raises(LmscopeError, match="needs k between 1 and its width 8"):
        SaeShape(d_in=4, width=8, arch="topk", k=9)
    with pytest.raises(LmscopeError, match="has no k"):
        SaeShape(d_in=4, width=8, arch="relu", k=2)
    with pytest.raises(LmscopeError, match="needs a transcoder"):
        SaeShape(d_in=4, width=8, arch="relu", d_out=5)
    sae = SparseAutoencoder(SaeShape(d_in=4, width=8, arch="relu", hook="blocks.1.hook_resid_post"))
    with pytest.raises(LmscopeError, match="input of width 5 given to an SAE of d_in 4; pass activations of hook blocks.1"):
        sae.encode(torch.zeros(2, 5))
