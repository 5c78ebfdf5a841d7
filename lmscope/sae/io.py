r"""lmscope's SAE files are SAELens's: ``cfg.json`` + ``sae_weights.safetensors``.

A directory written by :func:`save_sae` loads in SAELens 6.x with ``SAE.load_from_disk(dir)``,
and :func:`load_sae` reads what SAELens 6.x writes (checked against SAELens 6.54.12). The layout::

    cfg.json                  {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                               "normalize_activations", "reshape_activations", "metadata",
                               <architecture fields>, "architecture"}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
                              threshold [d_sae] (JumpReLU only), all in cfg["dtype"]; no header metadata

SAELens computes ``pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc`` and
``x_hat = act(pre) @ W_dec + b_dec``. lmscope architectures map to SAELens ones as follows:

=============  ================================  ================================================
lmscope        SAELens ``architecture``          architecture fields, tensors
=============  ================================  ================================================
relu           ``standard`` (transcoder:         — (transcoder: ``d_out``)
               ``transcoder``)
topk           ``topk``                          ``k``, ``rescale_acts_by_decoder_norm: false``
                                                 (transcoder: also ``d_out``, which SAELens drops:
                                                 it has no TopK transcoder and loads one only when
                                                 ``d_out == d_in``)
jumprelu       ``jumprelu`` (transcoder:         ``threshold = exp(log_threshold)`` (transcoder:
               ``jumprelu_transcoder``)          ``d_out``)
batchtopk      as jumprelu, as SAELens exports   ``threshold`` = the inference threshold;
               its BatchTopK SAEs                ``metadata.training_architecture = "batchtopk"``,
                                                 ``metadata.training_architecture_details.k``
=============  ================================  ================================================

What lmscope writes beyond that: weights act on raw activations (:func:`fold_scales` first, so
``normalize_activations`` is ``"none"``); ``apply_b_dec_to_input`` is true for an SAE and false
for a transcoder; ``metadata`` holds SAELens's ``sae_lens_version`` (without one SAELens treats a
config as pre-6.0 and rebuilds it), ``hook_name``, ``hook_name_out`` (transcoders),
``training_architecture``, and lmscope's own section ``metadata.lmscope = {"format_version",
"shape", "metadata"}`` where ``metadata`` is whatever the caller passed (model, revision, training
config, metrics). SAELens keeps unknown metadata keys when it loads and re-saves. A save and load
gives back the weights bit for bit, and the JumpReLU gate ``exp(log_threshold)`` too; since the file
holds the threshold, ``log_threshold`` itself may come back a few ulps away.

Reading SAELens's files, :func:`load_sae` also accepts: ``apply_b_dec_to_input`` that differs from
lmscope's convention (folded into ``b_enc``), ``rescale_acts_by_decoder_norm`` (folded into the
weights, as SAELens does when it exports), negative thresholds (SAELens's
``relu(pre)·[pre > θ]`` equals lmscope's ``pre·[pre > max(θ, 0)]``), SAELens training checkpoints
(``batchtopk`` with its scalar ``topk_threshold``; ``normalize_activations:
"expected_average_only_in"`` with the scaling factor in ``activation_scaler.json`` beside, folded in),
and pre-6.0 configs. The result always acts on raw activations with ``input_scale = output_scale = 1``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_directory
from lmscope.sae.model import SaeShape, SparseAutoencoder, fold_scales

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SCALER_FILENAME = "activation_scaler.json"
"""SAELens training checkpoints keep the ``expected_average_only_in`` scaling factor here."""

SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens version whose format lmscope writes and was checked against (``metadata.sae_lens_version``)."""

LMSCOPE_FORMAT_VERSION = 1
"""Version of the ``metadata.lmscope`` section; bump it when its meaning changes."""

READABLE_ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu", "batchtopk", "transcoder",
                                           "jumprelu_transcoder")
"""SAELens ``architecture`` values :func:`load_sae` understands."""

_TRANSCODERS = ("transcoder", "jumprelu_transcoder")
_SAELENS_TRAINING_NAME = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                                   "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_SAME_WIDTH_INTS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                    torch.bfloat16: torch.int16}
# Keys SAELens moves from the top level of a pre-6.0 config into ``metadata``.
_PRE_6_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index",
                        "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
                        "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
                        "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name",
                        "hf_hook_name_out")


# --------------------------------------------------------------------------------------------- save


def save_sae(sae: SparseAutoencoder, directory: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None,
             overwrite: bool = False) -> Path:
    """Write ``sae`` to ``directory`` as SAELens 6.x writes that architecture; return the directory.

    The input normalisation is folded in first, so the files compute on raw activations.
    ``metadata`` (JSON: model, revision, training config, metrics, …) is stored in
    ``cfg.json`` under ``metadata.lmscope.metadata`` and returned by :func:`load_sae`.
    The directory appears whole or not at all; with ``overwrite`` an existing one is replaced
    only once the new one is complete.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmscopeError(f"{target} already exists; pass overwrite=True to replace it or choose a new directory.")
    if target.exists() and not target.is_dir():
        raise LmscopeError(f"{target} is a file, not an SAE directory; remove it or choose another path.")
    if sae.W_enc.dtype not in _DTYPE_NAMES:
        raise LmscopeError(f"SAELens stores {', '.join(_DTYPES)} weights, not {sae.W_enc.dtype}; convert the SAE first.")
    folded = fold_scales(sae)
    cfg_text = _json_text(_saelens_cfg(folded, dict(metadata or {})))
    tensors = _saelens_tensors(folded)
    with _replace_directory(target) as staging:
        save_file(tensors, staging / WEIGHTS_FILENAME)
        (staging / CFG_FILENAME).write_text(cfg_text, encoding="utf-8")
        for name in (WEIGHTS_FILENAME, CFG_FILENAME):
            _fsync(staging / name)
    return target


def _saelens_cfg(sae: SparseAutoencoder, user_metadata: dict[str, Any]) -> dict[str, Any]:
    """``cfg.json`` for ``sae`` (scales already folded), keys in SAELens's order."""
    shape = sae.shape
    sae_metadata: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                                    "hook_name": shape.hook}
    if shape.transcoder:
        sae_metadata["hook_name_out"] = shape.out_hook
    sae_metadata["training_architecture"] = _SAELENS_TRAINING_NAME[shape.arch]
    if shape.arch == "batchtopk":
        sae_metadata["training_architecture_details"] = {"k": shape.k}
    sae_metadata["lmscope"] = {"format_version": LMSCOPE_FORMAT_VERSION, "shape": shape.to_dict(),
                               "metadata": user_metadata}
    fields: dict[str, Any] = {"k": shape.k, "rescale_acts_by_decoder_norm": False} if shape.arch == "topk" else {}
    if shape.transcoder:
        fields["d_out"] = shape.output_dim
    return {"d_in": shape.d_in, "d_sae": shape.width, "dtype": _DTYPE_NAMES[sae.W_enc.dtype], "device": "cpu",
            "apply_b_dec_to_input": not shape.transcoder, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": sae_metadata, **fields,
            "architecture": _saelens_architecture(shape)}


def _saelens_architecture(shape: SaeShape) -> str:
    if shape.arch == "topk":
        return "topk"  # also for transcoders: SAELens has no TopK transcoder class
    if shape.arch == "relu":
        return "transcoder" if shape.transcoder else "standard"
    return "jumprelu_transcoder" if shape.transcoder else "jumprelu"  # batchtopk too, as SAELens exports it


def _saelens_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.shape.arch in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.threshold.detach().cpu().contiguous()
    return tensors


def _json_text(cfg: dict[str, Any]) -> str:
    try:
        return json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise LmscopeError(f"the SAE metadata cannot be written as JSON ({error}); pass only strings, numbers, "
                           "booleans, None, lists and dicts, with null for NaN or infinite values.") from None


@contextmanager
def _replace_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``target`` (replacing it) once the body succeeds."""
    if not target.exists():
        with atomic_directory(target) as staging:
            yield staging
        return
    tag = uuid.uuid4().hex[:12]
    fresh, retired = target.with_name(f".{target.name}.new-{tag}"), target.with_name(f".{target.name}.old-{tag}")
    with atomic_directory(fresh) as staging:
        yield staging
    try:
        os.replace(target, retired)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    try:
        os.replace(fresh, target)
    except BaseException:
        os.replace(retired, target)
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------- load


def load_sae(directory: str | os.PathLike[str]) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read an SAE directory written by :func:`save_sae` or by SAELens 6.x (and most pre-6.0 ones).

    Returns the SAE on raw activations (scales 1, on the CPU, in ``cfg["dtype"]``) and its
    metadata: for a directory lmscope wrote, the ``metadata`` given to :func:`save_sae`; otherwise
    SAELens's own ``metadata`` section (``model_name``, ``hook_name``, …).
    """
    directory = Path(directory)
    cfg = _read_cfg(directory)
    architecture = cfg.get("architecture")
    if architecture not in READABLE_ARCHITECTURES:
        raise LmscopeError(f"{directory / CFG_FILENAME} has SAELens architecture {architecture!r}, which lmscope "
                           f"cannot read; supported: {', '.join(READABLE_ARCHITECTURES)}.")
    sae_metadata = cfg.get("metadata") or {}
    if not isinstance(sae_metadata, dict):
        raise LmscopeError(f"{directory / CFG_FILENAME} has a 'metadata' that is not an object; fix or remove it.")
    d_in, width = _positive_int(cfg, "d_in", directory), _positive_int(cfg, "d_sae", directory)
    dtype = _cfg_dtype(cfg, directory)
    if cfg.get("reshape_activations", "none") != "none":
        raise LmscopeError(f"{directory / CFG_FILENAME} has reshape_activations {cfg['reshape_activations']!r} "
                           "(per-head hook_z SAEs), which lmscope does not support; only 'none' is.")

    hook = sae_metadata.get("hook_name") or ""
    out_hook = sae_metadata.get("hook_name_out") or None
    transcoder = architecture in _TRANSCODERS or out_hook not in (None, hook)
    if transcoder and out_hook is None:
        raise LmscopeError(f"{directory / CFG_FILENAME} describes a transcoder ({architecture!r}) but gives no "
                           "target hook; add metadata.hook_name_out (the hook it reconstructs).")
    d_out = _positive_int(cfg, "d_out", directory) if transcoder and "d_out" in cfg else d_in
    arch, k = _lmscope_arch(architecture, cfg, sae_metadata, directory)
    scale = _input_scale(directory, cfg, transcoder)

    tensors = _read_tensors(directory / WEIGHTS_FILENAME, dtype)
    expected = {"W_enc": (d_in, width), "b_enc": (width,), "W_dec": (width, d_out), "b_dec": (d_out,)}
    if architecture == "batchtopk":
        expected["topk_threshold"] = ()
    elif arch in ("jumprelu", "batchtopk"):
        if "threshold" not in tensors and "log_threshold" in tensors:  # older JumpReLU checkpoints
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        expected["threshold"] = (width,)
    _check_tensors(tensors, expected, directory)

    shape = SaeShape(d_in=d_in, width=width, arch=arch, k=k, hook=hook, out_hook=out_hook if transcoder else None,
                     d_out=d_out if transcoder else None)
    weights = {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.get("rescale_acts_by_decoder_norm") and architecture in ("topk", "batchtopk"):
        _fold_decoder_norms(weights)
    _match_input_centring(weights, subtracts_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                          wanted=not transcoder, directory=directory)
    sae = SparseAutoencoder(shape, dtype=dtype)
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
        if arch in ("jumprelu", "batchtopk"):
            threshold = (tensors["topk_threshold"].reshape(1).expand(width).contiguous()
                         if architecture == "batchtopk" else tensors["threshold"])
            # SAELens computes relu(pre)·[pre > θ]; for θ < 0 that is relu(pre) = lmscope's pre·[pre > 0].
            sae.log_threshold.copy_(_exact_log(threshold.clamp_min(0)))
        if scale != 1.0:
            sae.input_scale.fill_(scale)
            sae.output_scale.fill_(scale)
    if scale != 1.0:
        sae = fold_scales(sae)
    lmscope_section = sae_metadata.get("lmscope")
    if isinstance(lmscope_section, dict) and isinstance(lmscope_section.get("metadata"), dict):
        return sae, lmscope_section["metadata"]
    return sae, sae_metadata


def load_sae_from_hub(repo_id: str, path_in_repo: str = "", *, revision: str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """:func:`load_sae` on ``path_in_repo`` of a Hugging Face repository (``""``: its root).

    Fetches only that folder's ``cfg.json``, ``sae_weights.safetensors`` and
    ``activation_scaler.json`` into the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` it reads the
    cached copy and never touches the network.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    folder = path_in_repo.strip("/")
    where = f"{repo_id}/{folder}" if folder else repo_id
    patterns = [f"{folder}/{name}" if folder else name for name in (CFG_FILENAME, WEIGHTS_FILENAME, SCALER_FILENAME)]
    try:
        root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise LmscopeError(f"the SAE {where} is not (completely) in the local Hugging Face cache and the Hub "
                           "cannot be reached (HF_HUB_OFFLINE=1 or no network); download it once with network "
                           "access.") from None
    except RevisionNotFoundError:
        raise LmscopeError(f"revision {revision!r} of {repo_id} does not exist on the Hugging Face Hub; "
                           "check the branch, tag or commit.") from None
    except RepositoryNotFoundError:
        raise LmscopeError(f"{repo_id} was not found on the Hugging Face Hub, or it is private or gated; check the "
                           "name, or log in with a token that has access.") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LmscopeError(f"could not fetch the SAE {where} from the Hugging Face Hub ({reason}).") from None
    return load_sae(Path(root) / folder)


def _read_cfg(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise LmscopeError(f"SAE directory {directory} does not exist; pass a directory holding {CFG_FILENAME} and "
                           f"{WEIGHTS_FILENAME}.")
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (directory / name).is_file():
            raise LmscopeError(f"{directory} has no {name}; an SAE directory holds {CFG_FILENAME} and "
                               f"{WEIGHTS_FILENAME} (as written by save_sae or SAELens).")
    try:
        cfg = json.loads((directory / CFG_FILENAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LmscopeError(f"{directory / CFG_FILENAME} is not valid JSON ({error}); rewrite it.") from None
    if not isinstance(cfg, dict):
        raise LmscopeError(f"{directory / CFG_FILENAME} holds a JSON {type(cfg).__name__}, not an object; rewrite it.")
    return cfg if _is_sae_lens_6(cfg) else _upgrade_pre_6(cfg)


def _is_sae_lens_6(cfg: dict[str, Any]) -> bool:
    metadata = cfg.get("metadata")
    version = cfg.get("sae_lens_version") or (metadata.get("sae_lens_version") if isinstance(metadata, dict) else None)
    try:
        return bool(version) and int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def _upgrade_pre_6(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 SAELens config in 6.x form (as SAELens's ``handle_pre_6_0_config`` does)."""
    new = {{"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}.get(key, key): value
           for key, value in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn", new.get("activation_fn_str")) == "topk" and kwargs.get("k") is not None:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    normalize = new.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        new["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    nested = new.get("metadata") if isinstance(new.get("metadata"), dict) else {}
    new["metadata"] = {**{key: value for key, value in new.items() if key in _PRE_6_METADATA_KEYS}, **nested}
    return new


def _positive_int(cfg: dict[str, Any], key: str, directory: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmscopeError(f"{directory / CFG_FILENAME} needs a positive integer {key!r}; found {value!r}.")
    return value


def _cfg_dtype(cfg: dict[str, Any], directory: Path) -> torch.dtype:
    name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if name not in _DTYPES:
        raise LmscopeError(f"{directory / CFG_FILENAME} has dtype {cfg.get('dtype')!r}; lmscope reads "
                           f"{', '.join(_DTYPES)}.")
    return _DTYPES[name]


def _lmscope_arch(architecture: str, cfg: dict[str, Any], sae_metadata: dict[str, Any],
                  directory: Path) -> tuple[str, int | None]:
    """lmscope ``arch`` and ``k`` for a SAELens config (a JumpReLU exported from BatchTopK is ``batchtopk``)."""
    if architecture in ("standard", "transcoder"):
        return "relu", None
    if architecture in ("topk", "batchtopk"):
        k = cfg.get("k")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise LmscopeError(f"{directory / CFG_FILENAME} is a {architecture} SAE with k={k!r}; lmscope needs a "
                               "whole number of active features.")
        return architecture, k
    # jumprelu, jumprelu_transcoder: SAELens saves BatchTopK SAEs this way, naming them in the metadata.
    details = sae_metadata.get("training_architecture_details")
    k = details.get("k") if isinstance(details, dict) else None
    if sae_metadata.get("training_architecture") == "batchtopk" and isinstance(k, (int, float)) \
            and not isinstance(k, bool) and float(k).is_integer() and 1 <= k <= cfg.get("d_sae", 0):
        return "batchtopk", int(k)
    return "jumprelu", None


def _input_scale(directory: Path, cfg: dict[str, Any], transcoder: bool) -> float:
    """The factor the SAE's inputs were multiplied by in training (1.0 for ``normalize_activations: none``)."""
    normalize = cfg.get("normalize_activations", "none")
    if normalize == "none":
        return 1.0
    if normalize == "expected_average_only_in" and not transcoder:
        scaler_path = directory / SCALER_FILENAME
        try:
            factor = json.loads(scaler_path.read_text(encoding="utf-8")).get("scaling_factor")
        except (OSError, ValueError, AttributeError):
            factor = None
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0:
            return float(factor)
        raise LmscopeError(f"{directory / CFG_FILENAME} says normalize_activations 'expected_average_only_in' but "
                           f"no positive scaling_factor is stored in {SCALER_FILENAME} beside it; fold the factor in "
                           "with SAELens (fold_activation_norm_scaling_factor) and save again.")
    raise LmscopeError(f"{directory / CFG_FILENAME} has normalize_activations {normalize!r}, which lmscope cannot "
                       "apply; it reads 'none', and 'expected_average_only_in' for SAEs whose "
                       f"{SCALER_FILENAME} holds the factor (SAELens folds whitening when training ends).")


def _read_tensors(path: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name).to(dtype) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise LmscopeError(f"{path} is not a readable safetensors file ({error}); write it again.") from None


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], directory: Path) -> None:
    scaling = tensors.pop("scaling_factor", None)  # SAELens < 6 stored an all-ones one for a while
    if scaling is not None and not torch.all(scaling == 1):
        raise LmscopeError(f"{directory / WEIGHTS_FILENAME} holds a finetuning scaling_factor other than 1, which "
                           "lmscope does not support; fold it into W_dec with SAELens first.")
    path = directory / WEIGHTS_FILENAME
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LmscopeError(f"{path} should hold exactly {', '.join(expected)} for this cfg.json; missing: "
                           f"{', '.join(missing) or 'none'}, unexpected: {', '.join(unexpected) or 'none'}.")
    wrong = [f"{name} is {list(tensors[name].shape)}, cfg.json implies {list(shape)}"
             for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    if wrong:
        raise LmscopeError(f"{path} contradicts its cfg.json: {'; '.join(wrong)}.")


def _fold_decoder_norms(weights: dict[str, Tensor]) -> None:
    """SAELens's ``rescale_acts_by_decoder_norm`` folded in, exactly as SAELens does on export."""
    norms = weights["W_dec"].norm(dim=-1).clamp(min=1e-8)
    weights["b_enc"] = weights["b_enc"] * norms
    weights["W_dec"] = weights["W_dec"] / norms.unsqueeze(1)
    weights["W_enc"] = weights["W_enc"] * norms.unsqueeze(1).T


def _match_input_centring(weights: dict[str, Tensor], *, subtracts_b_dec: bool, wanted: bool,
                          directory: Path) -> None:
    r"""Fold a difference in ``b_dec`` subtraction into ``b_enc``: :math:`(x - b)W + c = xW + (c - bW)`."""
    if subtracts_b_dec == wanted:
        return
    w_enc, b_dec = weights["W_enc"], weights["b_dec"]
    if b_dec.shape[0] != w_enc.shape[0]:
        raise LmscopeError(f"{directory / CFG_FILENAME} subtracts b_dec from inputs of a different width; "
                           "set apply_b_dec_to_input to false.")
    shift = (b_dec.double() @ w_enc.double()) * (1.0 if wanted else -1.0)
    weights["b_enc"] = (weights["b_enc"].double() + shift).to(w_enc.dtype)


def _exact_log(threshold: Tensor) -> Tensor:
    """``log(threshold)``, nudged by a few ulps where that makes its ``exp()`` give back ``threshold`` bit for bit.

    torch's ``log`` is not always the exact inverse of its ``exp``; the nudge keeps the gate of an
    SAE saved by lmscope identical after a load (its ``log_threshold`` may move by a few ulps).
    A threshold that is the ``exp()`` of no float (possible in SAELens's files) stays about an ulp off.
    """
    log = threshold.log()
    off = log.exp() != threshold
    if not off.any() or threshold.dtype not in _SAME_WIDTH_INTS:
        return log
    bits = log.view(_SAME_WIDTH_INTS[threshold.dtype])
    for step in (1, -1, 2, -2, 3, -3, 4, -4):
        candidate = (bits + step).view(threshold.dtype)  # neighbouring floats, `step` ulps away
        hit = off & (candidate.exp() == threshold)
        log = torch.where(hit, candidate, log)
        off &= ~hit
        if not off.any():
            break
    return log
