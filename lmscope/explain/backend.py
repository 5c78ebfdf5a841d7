"""The one interface every explainer language model answers: chat completions with log-probabilities.

A backend takes a :class:`ChatRequest` (messages, how many tokens, how many alternatives per token)
and answers a :class:`ChatResponse` (the text, and for each generated token its log-probability and the
``top_logprobs`` most likely alternatives). This is the shape of the OpenAI chat-completions API, so a
remote server (vLLM, llama.cpp, ollama, a hosted service) and a local ``transformers`` model fit behind it
alike. Decoding is greedy when ``temperature`` is 0, which makes answers reproducible and cacheable.

:class:`CachedChatModel` wraps any backend with a disk cache keyed by the backend's identity and the full
request, so a rerun of an explanation job repeats no model call.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_json


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str
    """Its text."""

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise LmscopeError(f"chat message role {self.role!r} is not one of system, user, assistant.")


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request."""

    messages: tuple[Message, ...]
    """The conversation so far; the model answers as the assistant."""
    max_tokens: int = 64
    """Most tokens generated."""
    temperature: float = 0.0
    """0: greedy decoding (reproducible, cacheable)."""
    top_logprobs: int = 0
    """Alternatives (token, log-probability) returned per generated token; 0: none."""
    stop: tuple[str, ...] = ()
    """Generation stops before any of these strings."""

    def __post_init__(self) -> None:
        if not self.messages:
            raise LmscopeError("a chat request needs at least one message.")
        if self.max_tokens < 1:
            raise LmscopeError(f"max_tokens {self.max_tokens} must be at least 1.")
        if not 0 <= self.top_logprobs <= 20:
            raise LmscopeError(f"top_logprobs {self.top_logprobs} must be in 0 … 20 (the OpenAI API's limit).")
        if self.temperature < 0:
            raise LmscopeError(f"temperature {self.temperature} must be non-negative.")

    def to_json(self) -> dict[str, Any]:
        return {"messages": [asdict(m) for m in self.messages], "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_logprobs": self.top_logprobs, "stop": list(self.stop)}


def chat(*turns: tuple[str, str], **options: Any) -> ChatRequest:
    """``chat(("system", "..."), ("user", "..."), max_tokens=8)``: a request from (role, content) pairs."""
    return ChatRequest(tuple(Message(role, content) for role, content in turns), **options)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)
    """Alternative token text → log-probability (the generated token among them when it ranks high enough)."""


@dataclass(frozen=True)
class ChatResponse:
    """What the model answered."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    """Per generated token, when the request asked for ``top_logprobs`` (the text is their concatenation)."""
    finish_reason: str | None = None
    """``stop`` (end of turn or a stop string) or ``length`` (``max_tokens`` reached)."""

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "tokens": [{"token": t.token, "logprob": t.logprob, "top": t.top} for t in self.tokens]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChatResponse":
        tokens = tuple(TokenLogprob(t["token"], float(t["logprob"]), {k: float(v) for k, v in t["top"].items()})
                       for t in data.get("tokens", []))
        return cls(data["text"], tokens, data.get("finish_reason"))


@runtime_checkable
class ChatModel(Protocol):
    """A language model that answers chat requests."""

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that determines its answers besides the request (backend, model, weights' version)."""

    def complete(self, request: ChatRequest) -> ChatResponse:
        """Answer one request."""


def request_key(identity: dict[str, Any], payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of (backend identity, request payload): the cache key."""
    blob = json.dumps({"backend": identity, "request": payload}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """JSON answers on disk, one file per key (``ab/abcdef….json``), each written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.misses += 1  # a damaged entry is recomputed and overwritten
            return None
        self.hits += 1
        return data

    def put(self, key: str, value: Any) -> None:
        atomic_write_json(self._path(key), value)


class CachedChatModel:
    """A :class:`ChatModel` whose answers are cached on disk by (identity, full request).

    Only deterministic requests (``temperature == 0``) are cached: a sampled answer is drawn afresh.
    """

    def __init__(self, inner: ChatModel, cache: ResponseCache | str | os.PathLike[str]) -> None:
        self.inner = inner
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)

    @property
    def identity(self) -> dict[str, Any]:
        return self.inner.identity

    def complete(self, request: ChatRequest) -> ChatResponse:
        return self.complete_many([request])[0]

    def complete_many(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """Answer ``requests``: cached ones from disk, the others together (in one batch where the backend can)."""
        answers: list[ChatResponse | None] = [None] * len(requests)
        keys: list[str | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            if request.temperature == 0:
                keys[i] = request_key(self.identity, request.to_json())
                hit = self.cache.get(keys[i])
                if hit is not None:
                    answers[i] = ChatResponse.from_json(hit)
        missing = [i for i, a in enumerate(answers) if a is None]
        for i, response in zip(missing, complete_all(self.inner, [requests[i] for i in missing])):
            answers[i] = response
            if keys[i] is not None:
                self.cache.put(keys[i], response.to_json())
        return [a for a in answers if a is not None]

    def memo(self, payload: dict[str, Any], compute: Any) -> Any:
        """``compute()``, cached on disk under (identity, ``payload``): for answers that are not chat completions."""
        key = request_key(self.identity, payload)
        hit = self.cache.get(key)
        if hit is None:
            hit = compute()
            self.cache.put(key, hit)
        return hit

    def __getattr__(self, name: str) -> Any:  # optional capabilities of the inner backend (e.g. forced scoring)
        return getattr(self.inner, name)


def complete_all(model: ChatModel, requests: list[ChatRequest]) -> list[ChatResponse]:
    """Answer every request: in batches where ``model`` has ``complete_many``, else one at a time."""
    if not requests:
        return []
    many = getattr(model, "complete_many", None)
    if many is not None:
        return list(many(requests))
    return [model.complete(r) for r in requests]
