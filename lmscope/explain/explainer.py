"""Choosing the explainer model: a local model spec, or an OpenAI-compatible server, with the answer cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.explain.backend import CachedChatModel, ChatModel


@dataclass(frozen=True)
class ExplainerConfig:
    """The language model that explains and simulates."""

    model: str = "default"
    """A model spec run locally with ``transformers`` (``default``: SmolLM2-135M-Instruct, offline), or, with
    ``base_url``, the model id the server serves."""
    base_url: str | None = None
    """An OpenAI-compatible API base (``http://host:port/v1``): vLLM, llama.cpp, ollama or a hosted service."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the server's API key (read at each call, never stored)."""
    cache: bool = True
    """Cache answers on disk under ``$LMSCOPE_HOME/explain-cache`` (keyed by backend and full request)."""
    batch_size: int = 8
    """Requests decoded together by a local model (or in flight at once on a server)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise LmscopeError("the explainer model is empty; give a model spec (e.g. default) or, with --base-url, a served model id.")
        if self.batch_size < 1:
            raise LmscopeError(f"explainer batch size {self.batch_size} must be at least 1.")


def open_chat_model(config: ExplainerConfig, *, device: str = "auto", dtype: str = "float32", loaded: Any = None,
                    cache_dir: str | os.PathLike[str] | None = None) -> ChatModel:
    """The explainer :class:`~lmscope.explain.backend.ChatModel` of ``config`` (cached unless ``config.cache`` is off).

    Args:
        loaded: an already loaded ``(model, tokenizer)`` of ``config.model`` to reuse instead of loading it again.
        cache_dir: where answers are cached (default ``$LMSCOPE_HOME/explain-cache``).
    """
    if config.base_url:
        from lmscope.explain.openai_http import OpenAIChatModel

        model: ChatModel = OpenAIChatModel(config.base_url, config.model, config.api_key_env, concurrency=config.batch_size)
    else:
        from lmscope.explain.local import LocalChatModel

        if loaded is not None:
            model = LocalChatModel(loaded[0], loaded[1], config.model, batch_size=config.batch_size)
        else:
            model = LocalChatModel.from_spec(config.model, dtype=dtype, device=device, batch_size=config.batch_size)
    if not config.cache:
        return model
    if cache_dir is None:
        from lmscope.home import lmscope_home

        cache_dir = lmscope_home() / "explain-cache"
    return CachedChatModel(model, Path(cache_dir))
