"""A :class:`~lmscope.explain.backend.ChatModel` that calls any OpenAI-compatible chat-completions server.

The same client serves the hosted OpenAI API, vLLM, llama.cpp's and llama-cpp-python's servers and
ollama: all of them answer ``POST {base_url}/chat/completions`` and ``GET {base_url}/models``. Only the
standard library is used (``urllib``), so the explain stage adds no HTTP dependency.

Transient failures (HTTP 408, 409, 429, 5xx gateways, a reset connection, a timeout) are retried with
exponential back-off; everything else becomes one :class:`~lmscope.errors.LmscopeError` sentence that says
what to change: the base URL, the API key's environment variable, the model name.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, NoReturn

from lmscope.errors import LmscopeError
from lmscope.explain.backend import ChatRequest, ChatResponse, TokenLogprob

TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, conflicts, rate limits and overloaded or restarting servers."""


class _Transient(Exception):
    """A failure that a later attempt may not meet; ``detail`` says what happened, for the final error."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class OpenAIChatModel:
    """Chat completions (with log-probabilities) from an OpenAI-compatible HTTP server.

    Args:
        base_url: the API base, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model id the server serves (checked against ``GET /models`` on the first call).
        api_key_env: the environment variable holding the API key, sent as ``Authorization: Bearer``;
            ``None`` for servers without keys. The key is read at each call and never stored.
        timeout: seconds to wait for one answer.
        max_retries: retries after a transient failure (so at most ``max_retries + 1`` attempts).
        backoff: the first retry waits ``backoff`` seconds, each later one twice as long (or as long as
            a numeric ``Retry-After`` header asks, when that is longer).
        sleep: how to wait (tests pass a recorder).
        concurrency: requests in flight at once in :meth:`complete_many`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        *,
        timeout: float = 120,
        max_retries: int = 5,
        backoff: float = 0.5,
        sleep: Callable[[float], Any] = time.sleep,
        concurrency: int = 4,
    ) -> None:
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise LmscopeError(
                f"base URL {base_url!r} is not an http:// or https:// URL; pass the API base, e.g. http://127.0.0.1:8000/v1."
            )
        if not model:
            raise LmscopeError("the chat model name is empty; pass the model id the server serves.")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise LmscopeError(
                f"max_retries {max_retries} and backoff {backoff} must be non-negative and timeout {timeout} positive."
            )
        self.base_url = url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.sleep = sleep
        self.concurrency = max(1, concurrency)
        self._served: list[str] | None = None  # model ids from GET /models, once checked

    @property
    def identity(self) -> dict[str, Any]:
        return {"backend": "openai-chat", "base_url": self.base_url, "model": self.model}

    def complete(self, request: ChatRequest) -> ChatResponse:
        """Answer one request: ``POST {base_url}/chat/completions``, after checking the model on the first call."""
        if self._served is None:
            self._check_model()
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.top_logprobs > 0:
            payload["logprobs"] = True
            payload["top_logprobs"] = request.top_logprobs
        answer = self._call("POST", "/chat/completions", payload)
        return self._parse(answer, request)

    def complete_many(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """Answer ``requests`` with up to ``concurrency`` calls in flight (servers batch concurrent requests)."""
        if not requests:
            return []
        if self._served is None:
            self._check_model()
        if self.concurrency == 1 or len(requests) == 1:
            return [self.complete(r) for r in requests]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self.complete, requests))

    # -- the model check ------------------------------------------------------------------------------

    def _check_model(self) -> None:
        """Fail early, with the served ids, when the server does not serve ``model``.

        Done lazily so that building a backend costs no request; done at all because servers differ on a
        wrong model (OpenAI answers 404, llama-cpp-python silently answers with whatever it has loaded).
        """
        answer = self._call("GET", "/models", None)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise LmscopeError(
                f"{self.base_url}/models did not answer an OpenAI model list (no 'data' array); "
                "check that --base-url is the API base of an OpenAI-compatible server (it usually ends in /v1)."
            )
        served = [str(item.get("id")) for item in data if isinstance(item, dict) and "id" in item]
        if self.model not in served:
            listing = ", ".join(served[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
            raise LmscopeError(
                f"model {self.model!r} is not served at {self.base_url}; it serves: {listing or 'no models'}."
            )
        self._served = served

    # -- HTTP -------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: dict[str, Any] | None) -> Any:
        """One API call with retries; the decoded JSON answer."""
        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(method, url, payload)
            except _Transient as failure:
                last = failure.detail
                if attempt == self.max_retries:
                    break
                delay = self.backoff * 2**attempt
                if failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                self.sleep(delay)
        tries = self.max_retries + 1
        raise LmscopeError(
            f"{method} {url} failed {tries} time{'s' if tries > 1 else ''} ({last}); the server is overloaded, "
            "rate-limiting or down: try again later, or allow more retries (max_retries)."
        )

    def _once(self, method: str, url: str, payload: dict[str, Any] | None) -> Any:
        headers = {"Accept": "application/json"}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            self._raise_for_status(method, url, err.code, err.headers, _body(err))
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"timed out after {self.timeout:g} s") from None
            if isinstance(reason, ConnectionResetError):
                raise _Transient("connection reset") from None
            raise LmscopeError(
                f"could not reach the chat-completions server at {self.base_url} ({reason}); "
                "check --base-url and that the server is running."
            ) from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"timed out after {self.timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as err:  # reset, or closed mid-answer
            raise _Transient(f"connection failed: {type(err).__name__}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LmscopeError(
                f"{method} {url} answered something that is not JSON ({_snippet(raw)}); "
                "check that --base-url is the API base of an OpenAI-compatible server (it usually ends in /v1)."
            ) from None

    def _raise_for_status(self, method: str, url: str, status: int, headers: Any, raw: bytes) -> NoReturn:
        """Turn an HTTP error into a retry (:class:`_Transient`) or one sentence saying what to fix."""
        message = _error_message(raw)
        if status in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status}{': ' + message if message else ''}", _retry_after(headers))
        if status in (401, 403):
            if not self.api_key_env:
                raise LmscopeError(
                    f"the server at {self.base_url} asks for an API key (HTTP {status}); "
                    "pass api_key_env naming the environment variable that holds a valid key."
                )
            if not os.environ.get(self.api_key_env):
                raise LmscopeError(
                    f"the server at {self.base_url} asks for an API key (HTTP {status}) and the environment variable "
                    f"{self.api_key_env} is not set; set it to a valid API key."
                )
            raise LmscopeError(
                f"the server at {self.base_url} rejected the API key in {self.api_key_env} (HTTP {status}); "
                f"set {self.api_key_env} to a valid API key."
            )
        if status == 404:
            if url.endswith("/models"):
                raise LmscopeError(
                    f"{url} was not found (HTTP 404), so {self.base_url} is not the base of an OpenAI-compatible API; "
                    "check --base-url (it usually ends in /v1)."
                )
            raise LmscopeError(
                f"{url} was not found (HTTP 404{': ' + message if message else ''}); check --base-url "
                f"(it usually ends in /v1) and that the server serves chat completions for model {self.model!r}."
            )
        raise LmscopeError(
            f"{method} {url} was refused with HTTP {status} ({message or 'no message'}); "
            "check the request (model, max_tokens, prompt length) against what the server accepts."
        )

    # -- parsing ------------------------------------------------------------------------------------------

    def _parse(self, answer: Any, request: ChatRequest) -> ChatResponse:
        """Text, finish reason and per-token log-probabilities of ``choices[0]``."""
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise LmscopeError(
                f"{self.base_url}/chat/completions answered JSON without choices[0].message "
                f"({_snippet(json.dumps(answer).encode())}); is it an OpenAI-compatible chat-completions server?"
            ) from None
        tokens: list[TokenLogprob] = []
        logprobs = choice.get("logprobs")  # null when not asked for, on most servers
        if request.top_logprobs > 0:
            if not isinstance(logprobs, dict):
                raise LmscopeError(
                    f"{self.base_url}/chat/completions answered without log-probabilities although the request asked "
                    f"for them; serve {self.model!r} from a server that returns logprobs and top_logprobs."
                )
            for entry in logprobs.get("content") or []:
                top: dict[str, float] = {}
                for alt in entry.get("top_logprobs") or []:
                    top.setdefault(alt["token"], float(alt["logprob"]))  # two ids, one text: keep the likelier
                tokens.append(TokenLogprob(entry["token"], float(entry["logprob"]), top))
        return ChatResponse(text, tuple(tokens), choice.get("finish_reason"))


def _body(err: urllib.error.HTTPError) -> bytes:
    """An error answer's body (closing it); empty when there is none or it breaks off."""
    try:
        return err.read() or b""
    except (OSError, http.client.HTTPException, AttributeError):
        return b""
    finally:
        err.close()


def _retry_after(headers: Any) -> float | None:
    """A numeric ``Retry-After`` in seconds; the HTTP-date form is ignored (the back-off applies)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(raw: bytes) -> str:
    """The server's own explanation: OpenAI's ``{"error": {"message": …}}``, else the start of the body."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _snippet(raw) if raw.strip() else ""
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return _snippet(raw)


def _snippet(raw: bytes, limit: int = 80) -> str:
    text = " ".join(raw.decode("utf-8", "replace").split())
    return repr(text if len(text) <= limit else text[:limit] + "…")
