"""lmscope's SAE files against the SAELens 6.x format.

Three kinds of truth: lmscope's own round trip (bitwise); directories written *by hand* exactly as
SAELens 6.54.12 was observed to write them, read back and compared with SAELens's formulas in plain
torch (no SAELens needed); and, where ``sae_lens`` is importable, SAELens itself in both directions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmscope.errors import LmscopeError
from lmscope.sae import io as sae_io
from lmscope.sae.io import load_sae, load_sae_from_hub, save_sae
from lmscope.sae.model import SaeShape, SparseAutoencoder, fold_scales

D_IN, WIDTH, D_OUT, K = 12, 40, 9, 5
HOOK, OUT_HOOK = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
CASES = [("relu", False), ("topk", False), ("batchtopk", False), ("jumprelu", False),
         ("relu", True), ("topk", True), ("batchtopk", True), ("jumprelu", True)]


def _x(n: int = 64, d: int = D_IN, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def _random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _lmscope_sae(arch: str, transcoder: bool, *, seed: int = 0, input_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """A trained-looking SAE: random biases, thresholds that let about half the features through."""
    shape = SaeShape(d_in=D_IN, width=WIDTH, arch=arch, k=K if arch in ("topk", "batchtopk") else None, hook=HOOK,
                     out_hook=OUT_HOOK if transcoder else None, d_out=D_OUT if transcoder else None)
    sae = SparseAutoencoder(shape, seed=seed, dtype=dtype)
    with torch.no_grad():
        sae.b_enc.copy_(_random(WIDTH, seed=seed + 1, scale=0.3))
        sae.b_dec.copy_(_random(shape.output_dim, seed=seed + 2, scale=0.5))
        if arch == "jumprelu":
            sae.log_threshold.copy_(_random(WIDTH, seed=seed + 3, scale=0.5) - 1.0)
        elif arch == "batchtopk":
            sae.log_threshold.fill_(-0.7)
        scale_out = input_scale * (1.7 if transcoder else 1.0)
        sae.input_scale.fill_(input_scale)
        sae.output_scale.fill_(scale_out)
    return sae


# ------------------------------------------------------------------- SAELens's formulas, in plain torch


def _saelens_encode(architecture: str, tensors: dict[str, torch.Tensor], x: torch.Tensor, *,
                    apply_b_dec_to_input: bool, k: int | None = None, rescale: bool = False) -> torch.Tensor:
    """What SAELens 6.54.12's ``encode`` computes (``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``, transcoders)."""
    sae_in = x - tensors["b_dec"] if apply_b_dec_to_input else x  # transcoders never subtract
    pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
    if architecture in ("standard", "transcoder"):
        return torch.relu(pre)
    if architecture == "topk":
        if rescale:
            pre = pre * tensors["W_dec"].norm(dim=-1)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    return torch.relu(pre) * (pre > tensors["threshold"]).to(pre.dtype)  # jumprelu, jumprelu_transcoder


def _saelens_decode(tensors: dict[str, torch.Tensor], acts: torch.Tensor, *, rescale: bool = False) -> torch.Tensor:
    if rescale:
        acts = acts * (1 / tensors["W_dec"].norm(dim=-1))
    return acts @ tensors["W_dec"] + tensors["b_dec"]


def _write_saelens_dir(directory: Path, architecture: str, tensors: dict[str, torch.Tensor], *,
                       apply_b_dec_to_input: bool = True, fields: dict[str, Any] | None = None,
                       metadata: dict[str, Any] | None = None, normalize: str = "none") -> Path:
    """A directory byte-for-byte in SAELens 6.54.12's ``save_model`` layout (key order included)."""
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize,
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "m",
                        "hook_name": HOOK, **(metadata or {})},
           **(fields or {}), "architecture": architecture}
    directory.mkdir(parents=True)
    with open(directory / "cfg.json", "w") as handle:
        json.dump(cfg, handle)
    save_file({name: value.contiguous() for name, value in tensors.items()}, directory / "sae_weights.safetensors")
    return directory


def _saelens_tensors(*, d_out: int = D_IN, threshold: bool = False, seed: int = 10) -> dict[str, torch.Tensor]:
    tensors = {"W_enc": _random(D_IN, WIDTH, seed=seed, scale=0.4), "b_enc": _random(WIDTH, seed=seed + 1, scale=0.3),
               "W_dec": _random(WIDTH, d_out, seed=seed + 2, scale=0.4), "b_dec": _random(d_out, seed=seed + 3)}
    if threshold:
        # Some negative and zero thresholds too: SAELens gates relu(pre), so those act like 0.
        tensors["threshold"] = _random(WIDTH, seed=seed + 4, scale=0.6)
        tensors["threshold"][:3] = 0.0
    return tensors


# ------------------------------------------------------------------------------- lmscope round trip


@pytest.mark.parametrize(("arch", "transcoder"), CASES)
def test_round_trip_is_bitwise_and_computes_the_same(tmp_path: Path, arch: str, transcoder: bool) -> None:
    sae = _lmscope_sae(arch, transcoder, seed=3)
    info = {"model": {"name": "pythia-14m"}, "revision": "step1000", "train": {"lr": 3e-4}, "metrics": {"fvu": 0.12}}
    directory = save_sae(sae, tmp_path / "sae", metadata=info)
    assert sorted(p.name for p in directory.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded, loaded_info = load_sae(directory)
    folded = fold_scales(sae)  # what is saved: the same SAE on raw activations (transcoders here scale their output)

    assert loaded_info == info
    assert loaded.shape == sae.shape
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(folded, name)), name
    assert torch.equal(loaded.threshold, sae.threshold)
    assert float(loaded.input_scale) == float(loaded.output_scale) == 1.0
    assert isinstance(loaded.log_threshold, torch.nn.Parameter) == (arch == "jumprelu")
    # log_threshold itself may move by a few ulps (SAELens stores the threshold), the gate does not.
    assert torch.allclose(loaded.log_threshold, sae.log_threshold, rtol=1e-6, atol=0)
    x = _x()
    assert torch.equal(loaded.encode(x), folded.encode(x))
    assert torch.equal(loaded(x), folded(x))
    assert torch.allclose(loaded(x), sae.forward_raw(x), atol=1e-5)
    assert (loaded.encode(x) != 0).any() and (loaded.encode(x) == 0).any()


@pytest.mark.parametrize(("arch", "transcoder"), [("topk", False), ("jumprelu", False), ("relu", True)])
def test_the_input_normalisation_is_folded_into_the_saved_weights(tmp_path: Path, arch: str,
                                                                   transcoder: bool) -> None:
    sae = _lmscope_sae(arch, transcoder, seed=4, input_scale=0.37)
    loaded, _ = load_sae(save_sae(sae, tmp_path / "sae"))
    folded = fold_scales(sae)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(folded, name)), name
    x = _x()
    assert torch.allclose(loaded(x), sae.forward_raw(x), atol=1e-5)
    assert torch.equal(loaded.encode(x), folded.encode(x))


def test_round_trip_keeps_float64_and_bfloat16(tmp_path: Path) -> None:
    for dtype in (torch.float64, torch.bfloat16):
        sae = _lmscope_sae("jumprelu", False, seed=5, dtype=dtype)
        loaded, _ = load_sae(save_sae(sae, tmp_path / str(dtype)))
        assert loaded.W_enc.dtype == dtype
        assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.threshold, sae.threshold)
        assert torch.equal(loaded.encode(_x(dtype=dtype)), sae.encode(_x(dtype=dtype)))


# Observed from SAELens 6.54.12: `save_model` of StandardSAE / TopKSAE / JumpReLUSAE / Transcoder /
# JumpReLUTranscoder, and `save_inference_model` of BatchTopKTrainingSAE (written as JumpReLU).
SAELENS_KEYS = ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "metadata"]
EXPECTED_CFG = {
    ("relu", False): ({"architecture": "standard"}, []),
    ("topk", False): ({"k": K, "rescale_acts_by_decoder_norm": False, "architecture": "topk"}, []),
    ("jumprelu", False): ({"architecture": "jumprelu"}, ["threshold"]),
    ("batchtopk", False): ({"architecture": "jumprelu"}, ["threshold"]),
    ("relu", True): ({"d_out": D_OUT, "architecture": "transcoder"}, []),
    ("topk", True): ({"k": K, "rescale_acts_by_decoder_norm": False, "d_out": D_OUT, "architecture": "topk"}, []),
    ("jumprelu", True): ({"d_out": D_OUT, "architecture": "jumprelu_transcoder"}, ["threshold"]),
    ("batchtopk", True): ({"d_out": D_OUT, "architecture": "jumprelu_transcoder"}, ["threshold"]),
}


@pytest.mark.parametrize(("arch", "transcoder"), CASES)
def test_files_have_saelens_keys_tensor_names_shapes_and_dtypes(tmp_path: Path, arch: str, transcoder: bool) -> None:
    directory = save_sae(_lmscope_sae(arch, transcoder), tmp_path / "sae", metadata={"revision": "main"})
    text = (directory / "cfg.json").read_text()
    cfg = json.loads(text)
    tail, extra_tensors = EXPECTED_CFG[(arch, transcoder)]
    assert list(cfg) == SAELENS_KEYS + list(tail)
    assert {key: cfg[key] for key in tail} == tail
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == WIDTH and cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is (not transcoder)
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    metadata = cfg["metadata"]
    assert metadata["sae_lens_version"] == "6.54.12" and metadata["hook_name"] == HOOK
    assert metadata.get("hook_name_out") == (OUT_HOOK if transcoder else None)
    assert metadata["training_architecture"] == {"relu": "standard"}.get(arch, arch)
    if arch == "batchtopk":
        assert metadata["training_architecture_details"] == {"k": K}
    assert metadata["lmscope"]["shape"]["arch"] == arch and metadata["lmscope"]["metadata"] == {"revision": "main"}
    assert "\n" not in text.strip()  # json.dump without indentation, as SAELens writes it

    d_out = D_OUT if transcoder else D_IN
    expected = {"W_enc": (D_IN, WIDTH), "b_enc": (WIDTH,), "W_dec": (WIDTH, d_out), "b_dec": (d_out,)}
    expected.update({name: (WIDTH,) for name in extra_tensors})
    with safe_open(directory / "sae_weights.safetensors", framework="pt") as handle:
        assert handle.metadata() is None
        assert sorted(handle.keys()) == sorted(expected)
        for name, shape in expected.items():
            tensor = handle.get_tensor(name)
            assert tuple(tensor.shape) == shape and tensor.dtype == torch.float32, name


# --------------------------------------------------------------- directories written as SAELens does


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_reads_a_saelens_standard_sae(tmp_path: Path, apply_b_dec_to_input: bool) -> None:
    tensors = _saelens_tensors()
    directory = _write_saelens_dir(tmp_path / "s", "standard", tensors, apply_b_dec_to_input=apply_b_dec_to_input)
    sae, metadata = load_sae(directory)
    assert sae.shape == SaeShape(d_in=D_IN, width=WIDTH, arch="relu", hook=HOOK)
    assert metadata["model_name"] == "m"
    x = _x()
    acts = _saelens_encode("standard", tensors, x, apply_b_dec_to_input=apply_b_dec_to_input)
    if apply_b_dec_to_input:  # the same operations: bit for bit
        assert torch.equal(sae.encode(x), acts)
        assert torch.equal(sae(x), _saelens_decode(tensors, acts))
    else:  # b_dec·W_enc folded into b_enc
        assert torch.allclose(sae.encode(x), acts, atol=1e-5)
        assert torch.allclose(sae(x), _saelens_decode(tensors, acts), atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_reads_a_saelens_topk_sae(tmp_path: Path, rescale: bool) -> None:
    tensors = _saelens_tensors()
    directory = _write_saelens_dir(tmp_path / "t", "topk", tensors,
                                   fields={"k": K, "rescale_acts_by_decoder_norm": rescale})
    sae, _ = load_sae(directory)
    assert sae.shape.arch == "topk" and sae.shape.k == K
    x = _x()
    acts = _saelens_encode("topk", tensors, x, apply_b_dec_to_input=True, k=K, rescale=rescale)
    assert ((acts != 0).sum(-1) <= K).all()
    if rescale:  # decoder norms folded into the weights, as SAELens does on export
        assert torch.equal(sae.encode(x) != 0, acts != 0)
        assert torch.allclose(sae.encode(x), acts, atol=1e-5)
        assert torch.allclose(sae(x), _saelens_decode(tensors, acts, rescale=True), atol=1e-5)
    else:
        assert torch.equal(sae.encode(x), acts)
        assert torch.equal(sae(x), _saelens_decode(tensors, acts))


def test_reads_a_saelens_jumprelu_sae_including_non_positive_thresholds(tmp_path: Path) -> None:
    tensors = _saelens_tensors(threshold=True)
    assert (tensors["threshold"] < 0).any()
    sae, _ = load_sae(_write_saelens_dir(tmp_path / "j", "jumprelu", tensors))
    assert sae.shape.arch == "jumprelu"
    x = _x()
    acts = _saelens_encode("jumprelu", tensors, x, apply_b_dec_to_input=True)
    assert torch.equal(sae.encode(x), acts)
    assert torch.equal(sae(x), _saelens_decode(tensors, acts))
    # lmscope stores log θ; a float32 θ that no float32 log reaches moves to a neighbouring float.
    assert torch.allclose(sae.threshold, tensors["threshold"].clamp_min(0), rtol=2e-7, atol=0)


def test_reads_a_saelens_batchtopk_export_as_batchtopk(tmp_path: Path) -> None:
    tensors = _saelens_tensors()
    tensors["threshold"] = torch.full((WIDTH,), 0.21)
    details = {"decoder_init_norm": 0.1, "k": 4, "use_sparse_activations": False, "aux_loss_coefficient": 1.0,
               "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01}
    directory = _write_saelens_dir(tmp_path / "b", "jumprelu", tensors, metadata={
        "training_architecture": "batchtopk", "training_architecture_details": details})
    sae, _ = load_sae(directory)
    assert sae.shape.arch == "batchtopk" and sae.shape.k == 4
    x = _x()
    assert torch.equal(sae.encode(x), _saelens_encode("jumprelu", tensors, x, apply_b_dec_to_input=True))


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_transcoder"])
def test_reads_saelens_transcoders(tmp_path: Path, architecture: str) -> None:
    tensors = _saelens_tensors(d_out=D_OUT, threshold=architecture == "jumprelu_transcoder")
    directory = _write_saelens_dir(tmp_path / "tc", architecture, tensors, apply_b_dec_to_input=False,
                                   fields={"d_out": D_OUT}, metadata={"hook_name_out": OUT_HOOK})
    sae, _ = load_sae(directory)
    assert sae.shape.transcoder and sae.shape.out_hook == OUT_HOOK and sae.shape.output_dim == D_OUT
    assert sae.shape.arch == ("relu" if architecture == "transcoder" else "jumprelu")
    x = _x()
    acts = _saelens_encode(architecture, tensors, x, apply_b_dec_to_input=False)
    assert torch.equal(sae.encode(x), acts)
    assert torch.equal(sae(x), _saelens_decode(tensors, acts))


def test_reads_a_saelens_training_checkpoint_with_its_scaler(tmp_path: Path) -> None:
    """A BatchTopK checkpoint: scalar float64 ``topk_threshold``, decoder-norm rescaling, unfolded scaling factor."""
    tensors = _saelens_tensors()
    fields = {"decoder_init_norm": 0.1, "k": 4, "use_sparse_activations": False, "aux_loss_coefficient": 1.0,
              "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01}
    directory = _write_saelens_dir(tmp_path / "ckpt", "batchtopk", {**tensors, "topk_threshold":
                                   torch.tensor(0.35, dtype=torch.float64)}, fields=fields,
                                   normalize="expected_average_only_in")
    (directory / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.8, "has_whitening": False}))
    sae, _ = load_sae(directory)
    assert sae.shape.arch == "batchtopk" and sae.shape.k == 4
    x = _x()
    # SAELens in training: scale the input, rescale pre-activations by decoder norms, gate at the threshold.
    norms = tensors["W_dec"].norm(dim=-1)
    pre = ((x * 0.8 - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]) * norms
    acts = torch.relu(pre) * (pre > 0.35)
    expected = ((acts / norms) @ tensors["W_dec"] + tensors["b_dec"]) / 0.8
    assert torch.equal(sae.encode(x) != 0, acts != 0)
    assert torch.allclose(sae.encode(x), acts, atol=1e-5) and torch.allclose(sae(x), expected, atol=1e-5)


def test_reads_a_pre_6_saelens_config(tmp_path: Path) -> None:
    tensors = _saelens_tensors()
    cfg = {"d_in": D_IN, "d_sae": WIDTH, "dtype": "torch.float32", "model_name": "gpt2-small", "hook_point": HOOK,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
           "normalize_activations": False, "sae_lens_training_version": "3.1.0"}
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, directory / "sae_weights.safetensors")
    sae, metadata = load_sae(directory)
    assert sae.shape == SaeShape(d_in=D_IN, width=WIDTH, arch="topk", k=K, hook=HOOK)
    assert metadata["model_name"] == "gpt2-small"
    x = _x()
    assert torch.equal(sae.encode(x), _saelens_encode("topk", tensors, x, apply_b_dec_to_input=True, k=K))


# -------------------------------------------------------------------------------------- bad inputs


def _error(directory: Path) -> str:
    with pytest.raises(LmscopeError) as caught:
        load_sae(directory)
    return str(caught.value)


def _edit_cfg(directory: Path, **changes: Any) -> None:
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg.update(changes)
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files_are_named(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nowhere")
    directory = save_sae(_lmscope_sae("relu", False), tmp_path / "sae")
    (directory / "sae_weights.safetensors").unlink()
    assert "has no sae_weights.safetensors" in _error(directory)
    (directory / "cfg.json").unlink()
    assert "has no cfg.json" in _error(directory)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    directory = save_sae(_lmscope_sae("relu", False), tmp_path / "sae")
    _edit_cfg(directory, architecture="gated")
    message = _error(directory)
    assert "'gated'" in message and "standard, topk, jumprelu, batchtopk, transcoder, jumprelu_transcoder" in message


def test_weights_that_contradict_the_cfg_are_refused(tmp_path: Path) -> None:
    directory = save_sae(_lmscope_sae("jumprelu", False), tmp_path / "sae")
    _edit_cfg(directory, d_sae=WIDTH + 1)
    assert "contradicts its cfg.json: W_enc is [12, 40], cfg.json implies [12, 41]" in _error(directory)
    _edit_cfg(directory, d_sae=WIDTH, architecture="standard")
    assert "unexpected: threshold" in _error(directory)
    _write_saelens_dir(tmp_path / "short", "jumprelu", _saelens_tensors())
    assert "missing: threshold" in _error(tmp_path / "short")


@pytest.mark.parametrize("normalize", ["layer_norm", "constant_norm_rescale", "covariance_whitening"])
def test_normalisations_lmscope_cannot_apply_are_refused(tmp_path: Path, normalize: str) -> None:
    directory = save_sae(_lmscope_sae("topk", False), tmp_path / "sae")
    _edit_cfg(directory, normalize_activations=normalize)
    assert f"normalize_activations {normalize!r}" in _error(directory)


def test_a_scaling_factor_that_is_not_stored_is_refused(tmp_path: Path) -> None:
    directory = save_sae(_lmscope_sae("topk", False), tmp_path / "sae")
    _edit_cfg(directory, normalize_activations="expected_average_only_in")
    assert "no positive scaling_factor is stored in activation_scaler.json" in _error(directory)


def test_a_transcoder_without_its_target_hook_is_refused(tmp_path: Path) -> None:
    directory = _write_saelens_dir(tmp_path / "tc", "transcoder", _saelens_tensors(d_out=D_OUT),
                                   apply_b_dec_to_input=False, fields={"d_out": D_OUT})
    assert "gives no target hook; add metadata.hook_name_out" in _error(directory)


def test_other_refusals(tmp_path: Path) -> None:
    directory = save_sae(_lmscope_sae("relu", False), tmp_path / "sae")
    _edit_cfg(directory, reshape_activations="hook_z")
    assert "reshape_activations 'hook_z'" in _error(directory)
    (directory / "cfg.json").write_text("{not json")
    assert "is not valid JSON" in _error(directory)
    with pytest.raises(LmscopeError, match="already exists; pass overwrite=True"):
        save_sae(_lmscope_sae("relu", False), directory)
    sae = _lmscope_sae("relu", False)
    with torch.no_grad():
        sae.output_scale.fill_(2.0)
    with pytest.raises(LmscopeError, match="must scale input and output alike"):
        save_sae(sae, tmp_path / "mismatched")
    with pytest.raises(LmscopeError, match="cannot be written as JSON"):
        save_sae(_lmscope_sae("relu", False), tmp_path / "nan", metadata={"fvu": math.nan})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# -------------------------------------------------------------------------------------- atomicity


def _failing_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    Path(path).write_bytes(b"half a safetensors file")
    raise OSError("disk full")


def test_a_failed_save_leaves_no_directory_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae_io, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_sae(_lmscope_sae("topk", False), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_complete_sae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _lmscope_sae("topk", False, seed=1), _lmscope_sae("jumprelu", False, seed=2)
    directory = save_sae(first, tmp_path / "sae", metadata={"which": "first"})
    with monkeypatch.context() as patch:
        patch.setattr(sae_io, "save_file", _failing_save_file)
        with pytest.raises(OSError, match="disk full"):
            save_sae(second, directory, overwrite=True)
    loaded, info = load_sae(directory)
    assert info == {"which": "first"} and torch.equal(loaded.W_enc, first.W_enc)
    save_sae(second, directory, overwrite=True, metadata={"which": "second"})
    loaded, info = load_sae(directory)
    assert info == {"which": "second"} and loaded.shape.arch == "jumprelu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


# ------------------------------------------------------------------------------------ Hugging Face


def test_load_from_hub_reads_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "cache" / "models--someone--saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sae = _lmscope_sae("topk", False)
    save_sae(sae, repo / "snapshots" / commit / "layer_1" / "width_40", metadata={"from": "hub"})

    loaded, info = load_sae_from_hub("someone/saes", "layer_1/width_40", cache_dir=tmp_path / "cache")
    assert info == {"from": "hub"} and torch.equal(loaded.encode(_x()), sae.encode(_x()))
    with pytest.raises(LmscopeError, match="not .completely. in the local Hugging Face cache"):
        load_sae_from_hub("someone/other", "layer_1", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------ SAELens, if installed


def _saelens_sae_cases() -> list[tuple[str, bool]]:
    # SAELens has no TopK transcoder: lmscope's loads there only when d_out == d_in (tested below).
    return [case for case in CASES if case != ("topk", True)]


@pytest.mark.parametrize(("arch", "transcoder"), _saelens_sae_cases())
def test_saelens_loads_what_lmscope_saves(tmp_path: Path, arch: str, transcoder: bool) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = _lmscope_sae(arch, transcoder, seed=6, input_scale=0.5)
    directory = save_sae(sae, tmp_path / "sae", metadata={"revision": "step10"})
    theirs = sae_lens.SAE.load_from_disk(directory)
    expected_class = {("relu", False): "StandardSAE", ("relu", True): "Transcoder", ("topk", False): "TopKSAE"}.get(
        (arch, transcoder), "JumpReLUTranscoder" if transcoder else "JumpReLUSAE")
    assert type(theirs).__name__ == expected_class
    x, folded = _x(), fold_scales(sae)
    with torch.no_grad():
        assert torch.equal(theirs.encode(x), folded.encode(x))  # the same operations: bit for bit
        assert torch.equal(theirs(x), folded(x))
        assert torch.allclose(theirs(x), sae.forward_raw(x), atol=1e-5)
    # SAELens writes back exactly what it read: same keys, same order, lmscope's metadata kept.
    theirs.save_model(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "cfg.json").read_text() == (directory / "cfg.json").read_text()
    again, info = load_sae(tmp_path / "resaved")
    assert info == {"revision": "step10"} and again.shape == sae.shape


def test_saelens_loads_a_square_lmscope_topk_transcoder(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    shape = SaeShape(d_in=D_IN, width=WIDTH, arch="topk", k=K, hook=HOOK, out_hook=OUT_HOOK, d_out=D_IN)
    sae = SparseAutoencoder(shape, seed=7)
    with torch.no_grad():
        sae.b_dec.copy_(_random(D_IN, seed=8))
    theirs = sae_lens.SAE.load_from_disk(save_sae(sae, tmp_path / "sae"))
    assert theirs.cfg.metadata.hook_name_out == OUT_HOOK and theirs.cfg.apply_b_dec_to_input is False
    with torch.no_grad():
        assert torch.equal(theirs(_x()), sae(_x()))


def _fill_saelens(sae: Any, seed: int) -> None:
    with torch.no_grad():
        for offset, (name, parameter) in enumerate(sorted(sae.named_parameters())):
            parameter.copy_(_random(*parameter.shape, seed=seed + offset, scale=0.4))


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu", "transcoder", "jumprelu_transcoder",
                                  "batchtopk_training", "topk_training_rescaled"])
def test_lmscope_loads_what_saelens_saves(tmp_path: Path, kind: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(model_name="m", hook_name=HOOK)
    transcoder = kind.endswith("transcoder")
    if transcoder:
        metadata.hook_name_out = OUT_HOOK
        classes = {"transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
                   "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig)}[kind]
        theirs = classes[0](classes[1](d_in=D_IN, d_sae=WIDTH, d_out=D_OUT, apply_b_dec_to_input=False,
                                       metadata=metadata))
    elif kind == "batchtopk_training":
        theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K,
                                                                                   metadata=metadata))
    elif kind == "topk_training_rescaled":
        theirs = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K,
                                                                         rescale_acts_by_decoder_norm=True,
                                                                         metadata=metadata))
    else:
        classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
                   "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                   "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[kind]
        theirs = classes[0](classes[1](d_in=D_IN, d_sae=WIDTH, metadata=metadata,
                                       **({"k": K} if kind == "topk" else {})))
    _fill_saelens(theirs, seed=20)
    if kind == "batchtopk_training":
        theirs.topk_threshold = torch.tensor(0.3, dtype=torch.float64)
    if "training" in kind:
        theirs.save_inference_model(tmp_path / "sae")
        reference = sae_lens.SAE.load_from_disk(tmp_path / "sae")  # the inference SAE SAELens exported
    else:
        theirs.save_model(tmp_path / "sae")
        reference = theirs
    sae, info = load_sae(tmp_path / "sae")
    assert info["hook_name"] == HOOK and sae.shape.hook == HOOK
    assert sae.shape.arch == {"standard": "relu", "transcoder": "relu", "jumprelu_transcoder": "jumprelu",
                              "batchtopk_training": "batchtopk", "topk_training_rescaled": "topk"}.get(kind, kind)
    assert sae.shape.transcoder == transcoder
    x = _x()
    with torch.no_grad():
        ours, expected = sae.encode(x), reference.encode(x)
        assert (expected != 0).any() and (expected == 0).any()
        assert torch.equal(ours != 0, expected != 0)
        assert torch.allclose(ours, expected, atol=1e-5)
        assert torch.allclose(sae(x), reference(x), atol=1e-5)
        if kind != "topk_training_rescaled":  # the same operations as SAELens: bit for bit
            assert torch.equal(ours, expected)
