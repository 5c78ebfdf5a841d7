"""A local ``transformers`` chat model behind the :class:`~lmscope.explain.backend.ChatModel` interface.

Everything runs through one primitive, :class:`DecodingRows`: several sequences continued together from one
shared key/value cache. A prompt prefix common to every row (a chat template's system message, an
explanation shared by many scoring prompts) is run once and the cache copied to each row; after that each
row is fed its own chunk of tokens per call, the chunks right-padded to one length and the padding masked
out of attention for the rest of the run. Positions count real tokens only, so a padded row is computed as
it would be alone. Greedy generation, single-token scoring and the simulator's line-by-line forced
decoding (:meth:`LocalChatModel.forced_digit_distributions`) are loops over ``feed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmscope.errors import LmscopeError
from lmscope.explain.backend import ChatRequest, ChatResponse, TokenLogprob

DIGITS = tuple(str(d) for d in range(10))


class DecodingRows:
    """``B`` sequences decoded together from one cache; ragged chunks are right-padded and masked.

    Attributes:
        mask: ``[B, T]`` 1 where a cache position holds a real token of that row, 0 for padding.
    """

    def __init__(self, model: Any, cache: Any, mask: Tensor, pad_id: int) -> None:
        self.model = model
        self.cache = cache
        self.mask = mask
        self.pad_id = pad_id

    @classmethod
    @torch.no_grad()
    def start(cls, model: Any, prefix: Sequence[int], batch: int, pad_id: int) -> tuple["DecodingRows", Tensor]:
        """Run ``prefix`` once and give ``batch`` rows that continue it; also the logits ``[V]`` after the prefix."""
        from transformers import DynamicCache

        if not prefix:
            raise LmscopeError("a decoding prefix needs at least one token.")
        device = model.device
        ids = torch.as_tensor([list(prefix)], device=device)
        cache = DynamicCache()
        out = model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache})
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        mask = torch.ones((batch, len(prefix)), dtype=torch.long, device=device)
        return cls(model, cache, mask, pad_id), out.logits[0, -1].float()

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def feed(self, chunks: Sequence[Sequence[int]]) -> Tensor:
        """Append each row's chunk; return ``[B, V]`` logits after each row's last real token (rows fed nothing: NaN)."""
        if len(chunks) != self.batch:
            raise LmscopeError(f"{len(chunks)} chunks for {self.batch} decoding rows.")
        width = max(len(c) for c in chunks)
        if width == 0:
            return torch.full((self.batch, self.model.config.vocab_size), math.nan)
        device = self.mask.device
        ids = torch.full((self.batch, width), self.pad_id, dtype=torch.long, device=device)
        new = torch.zeros((self.batch, width), dtype=torch.long, device=device)
        for row, chunk in enumerate(chunks):
            if chunk:
                ids[row, : len(chunk)] = torch.as_tensor(list(chunk), device=device)
                new[row, : len(chunk)] = 1
        start = self.mask.sum(dim=1, keepdim=True)  # real tokens so far = next position
        positions = start + (new.cumsum(dim=1) - 1).clamp_min(0)
        self.mask = torch.cat([self.mask, new], dim=1)
        last = [max(len(c) - 1, 0) for c in chunks]
        keep = sorted(set(last))  # the unembedding runs only where some row's last token is (it dominates small chunks)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=torch.as_tensor(keep, device=device), **{_cache_argument(self.model): self.cache})
        column = torch.as_tensor([keep.index(i) for i in last], device=device)
        logits = out.logits[torch.arange(self.batch, device=device), column].float()
        empty = torch.as_tensor([len(c) == 0 for c in chunks], device=device)
        return logits.masked_fill(empty[:, None], math.nan)

    def crop(self, n: int) -> None:
        """Forget the last ``n`` fed positions (of every row)."""
        if n:
            self.cache.crop(-n)  # a negative length removes that many positions (every transformers version)
            self.mask = self.mask[:, :-n]


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in newer ``transformers``, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


class LocalChatModel:
    """A chat model run in this process with ``transformers`` (greedy or sampled decoding, top log-probabilities).

    Args:
        model: a causal LM (``AutoModelForCausalLM``) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        name: the model spec it was loaded from (part of :attr:`identity`, hence of every cache key).
        batch_size: requests decoded together by :meth:`complete_many`.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, batch_size: int = 8) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LmscopeError(f"model {name!r} has no tokenizer with a chat template; explain with an instruct (chat) model "
                               "such as `default`, or an OpenAI-compatible server (--base-url).")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.end_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids, default=0)
        self._piece_cache: dict[int, str] = {}

    @classmethod
    def from_spec(cls, spec: str = "default", *, dtype: str = "float32", device: str = "auto", batch_size: int = 8) -> "LocalChatModel":
        """Load ``spec`` (any model spec; ``default`` is SmolLM2-135M-Instruct, offline)."""
        from lmscope.models.loading import load_model

        loaded = load_model(spec, dtype=dtype, device=device)
        return cls(loaded.model, loaded.tokenizer, spec, batch_size=batch_size)

    @property
    def identity(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.name, "dtype": str(self.model.dtype).removeprefix("torch.")}

    # -- tokens ------------------------------------------------------------------------------------------

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The chat template applied to the request's messages, ready for the assistant's answer."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def piece(self, token_id: int) -> str:
        """The text of one token."""
        if token_id not in self._piece_cache:
            self._piece_cache[token_id] = self.tokenizer.decode([token_id])
        return self._piece_cache[token_id]

    # -- chat completions ----------------------------------------------------------------------------------

    def complete(self, request: ChatRequest) -> ChatResponse:
        return self.complete_many([request])[0]

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        """Answer ``requests`` in batches of ``batch_size`` (same answers as one at a time, up to float rounding)."""
        out: list[ChatResponse] = []
        for start in range(0, len(requests), self.batch_size):
            out += self._complete_batch(list(requests[start : start + self.batch_size]))
        return out

    @torch.no_grad()
    def _complete_batch(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        prompts = [self.prompt_ids(r) for r in requests]
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)  # every row feeds >= 1 token
        if shared < 1:
            if len(requests) == 1:
                raise LmscopeError("a chat prompt must be at least two tokens long.")
            return [response for request in requests for response in self._complete_batch([request])]
        rows, _ = DecodingRows.start(self.model, prompts[0][:shared], len(requests), self.pad_id)
        logits = rows.feed([p[shared:] for p in prompts])
        generators = [torch.Generator().manual_seed(0) for _ in requests]
        generated: list[list[int]] = [[] for _ in requests]
        records: list[list[TokenLogprob]] = [[] for _ in requests]
        finish: list[str | None] = [None] * len(requests)
        for _ in range(max(r.max_tokens for r in requests)):
            chunks: list[list[int]] = []
            for i, request in enumerate(requests):
                if finish[i] is not None:
                    chunks.append([])
                    continue
                logprobs = torch.log_softmax(logits[i], dim=-1)
                if request.temperature == 0:
                    token = int(logprobs.argmax())
                else:
                    probs = torch.softmax(logits[i] / request.temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generators[i]))
                if token in self.end_ids:
                    finish[i] = "stop"
                    chunks.append([])
                    continue
                top: dict[str, float] = {}
                if request.top_logprobs:
                    values, indices = logprobs.topk(request.top_logprobs)
                    for v, t in zip(values.tolist(), indices.tolist()):
                        top.setdefault(self.piece(t), v)  # two ids can decode alike; keep the likelier
                generated[i].append(token)
                records[i].append(TokenLogprob(self.piece(token), float(logprobs[token]), top))
                text = "".join(r.token for r in records[i])
                if any(s in text for s in request.stop):
                    finish[i] = "stop"
                    chunks.append([])
                    continue
                if len(generated[i]) >= request.max_tokens:
                    finish[i] = "length"
                    chunks.append([])
                    continue
                chunks.append([token])
            if all(f is not None for f in finish):
                break
            logits = rows.feed(chunks)
        responses = []
        for i, request in enumerate(requests):
            text = "".join(r.token for r in records[i])
            tokens = records[i]
            cut = min((text.find(s) for s in request.stop if s in text), default=-1)
            if cut >= 0:  # drop the stop string and what follows, as the API does
                text, kept, length = text[:cut], [], 0
                for record in tokens:
                    if length >= cut:
                        break
                    kept.append(record)
                    length += len(record.token)
                tokens = kept
            responses.append(ChatResponse(text, tuple(tokens) if request.top_logprobs else (), finish[i] or "length"))
        return responses

    # -- the simulator's forced decoding ----------------------------------------------------------------

    @torch.no_grad()
    def forced_digit_distributions(self, request: ChatRequest, lines: Sequence[Sequence[str]]) -> list[Tensor]:
        """For each record, the model's distribution over activations 0 … 10 at every line of its answer.

        The assistant's answer to ``request`` is forced to be one line per token, ``"<token>\\t<activation>\\n"``:
        the token texts are given (``lines[r]`` for record ``r``), the activation after each tab is the model's
        own most likely value, written before the next line is read, as it would have written it. At every tab
        the distribution over the first digit is read; ``"1"`` is split into 1 and 10 by one more step that
        reads P("0" | "1"). All records continue one shared prompt in one batch.

        Returns:
            per record, ``[len(lines[r]), 11]`` probabilities (rows sum to 1) over the values 0 … 10.
        """
        digit_ids = [self.encode(d) for d in DIGITS]
        if any(len(ids) != 1 for ids in digit_ids):
            raise LmscopeError(f"model {self.name!r} does not tokenize each digit 0-9 as one token; the forced simulator needs that.")
        digit_ids_t = torch.as_tensor([ids[0] for ids in digit_ids])
        one, zero = digit_ids[1][0], digit_ids[0][0]
        prompt = self.prompt_ids(request)
        n_records = len(lines)
        out = [torch.zeros((len(r), 11)) for r in lines]
        if n_records == 0:
            return out
        rows, _ = DecodingRows.start(self.model, prompt, n_records, self.pad_id)
        written: list[str | None] = [None] * n_records
        for step in range(max(len(r) for r in lines)):
            active = [step < len(r) for r in lines]
            chunks = []
            for r in range(n_records):
                if not active[r]:
                    chunks.append([])
                    continue
                text = ("" if written[r] is None else f"{written[r]}\n") + f"{lines[r][step]}\t"
                chunks.append(self.encode(text))
            logits = rows.feed(chunks)
            first = torch.softmax(logits, dim=-1)[:, digit_ids_t]  # [B, 10]; NaN for inactive rows
            probe = rows.feed([[one] if a else [] for a in active])
            ten = torch.softmax(probe, dim=-1)[:, zero]  # P("0" | "1")
            rows.crop(1)
            for r in range(n_records):
                if not active[r]:
                    continue
                p = torch.zeros(11)
                p[:10] = first[r]
                p[10] = first[r, 1] * ten[r]
                p[1] = first[r, 1] * (1 - ten[r])
                p = p / p.sum().clamp_min(1e-30)
                out[r][step] = p
                written[r] = str(int(p.argmax()))
        return out
