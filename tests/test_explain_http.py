"""OpenAIChatModel against a real OpenAI-compatible server (llama-cpp-python on loopback, the default GGUF).

The server's log-probabilities are checked against Hugging Face's forward pass of the same weights;
caching, retries and the error sentences are checked through a real loopback proxy that counts
requests and injects failures, not through mocks.
"""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.explain.backend import CachedChatModel, ChatRequest, ChatResponse, chat
from lmscope.explain.openai_http import OpenAIChatModel
from llama_server import API_KEY, MODEL_ALIAS, FaultyProxy, LlamaServer, free_port, llama_server, server_root  # noqa: F401

pytestmark = pytest.mark.default_model

KEY_ENV = "LMSCOPE_TEST_CHAT_KEY"
SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return KEY_ENV


def backend(base_url: str, **options) -> OpenAIChatModel:
    return OpenAIChatModel(base_url, MODEL_ALIAS, KEY_ENV, **options)


def paris(**options) -> ChatRequest:
    return chat(("system", SYSTEM), ("user", QUESTION), **options)


class Delays(list):
    """A ``sleep`` that records what it was asked to wait, and does not wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# -- answers against an independent truth ----------------------------------------------------------------


def test_first_token_distribution_matches_hugging_face(llama_server: LlamaServer, key: str, one_torch_thread) -> None:
    from lmscope.models.loading import load_model

    answer = backend(llama_server.base_url).complete(paris(max_tokens=16, top_logprobs=20))
    assert "Paris" in answer.text
    first = answer.tokens[0]

    loaded = load_model("default", device="cpu")
    tokenizer = loaded.tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    # Both sides must see the same prompt, or the comparison means nothing: the server reports its count.
    raw = urllib.request.Request(
        f"{llama_server.base_url}/chat/completions",
        data=json.dumps({"model": MODEL_ALIAS, "messages": messages, "max_tokens": 1, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(raw, timeout=60) as response:
        assert json.loads(response.read())["usage"]["prompt_tokens"] == ids.shape[1]
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model(ids).logits[0, -1].double(), dim=-1)
    top = torch.topk(logprobs, 5)
    hf = {tokenizer.decode([int(i)]): float(lp) for lp, i in zip(top.values, top.indices)}

    assert first.token == next(iter(hf)), (first.token, hf)
    assert first.logprob == max(first.top.values())  # greedy: the generated token is the most likely one
    # The server runs the Q4_1 weights with Q8 activations, Hugging Face the dequantised weights in fp32.
    # Measured here: the largest gap is 0.036, on "The" (0.331 in fp32, 0.295 on the server), the others
    # under 0.006; across the first six tokens of three prompts no gap passed 0.037. Bound with margin:
    gaps = {tok: abs(math.exp(first.top[tok]) - math.exp(lp)) for tok, lp in hf.items()}
    assert max(gaps.values()) <= 0.05, gaps

    greedy = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True) == answer.text


def test_text_is_the_tokens_and_length_stops_it(llama_server: LlamaServer, key: str) -> None:
    model = backend(llama_server.base_url)
    answer = model.complete(chat(("user", "Count from one to twenty in words."), max_tokens=5, top_logprobs=2))
    assert answer.finish_reason == "length"
    assert len(answer.tokens) == 5
    assert answer.text == "".join(t.token for t in answer.tokens)
    assert all(len(t.top) >= 2 and t.logprob <= 0 for t in answer.tokens)

    plain = model.complete(paris(max_tokens=16))  # no logprobs asked: the server answers null, we answer none
    assert plain.tokens == () and "Paris" in plain.text and plain.finish_reason == "stop"
    stopped = model.complete(paris(max_tokens=16, stop=(" Paris",)))
    assert stopped.text == plain.text[: plain.text.index(" Paris")] and stopped.finish_reason == "stop"


# -- cache and retries, through a real proxy ----------------------------------------------------------------


def test_cached_answer_reaches_no_server(llama_server: LlamaServer, key: str, tmp_path) -> None:
    with FaultyProxy(server_root(llama_server.base_url)) as proxy:
        cached = CachedChatModel(backend(proxy.base_url), tmp_path / "cache")
        first = cached.complete(paris(max_tokens=4, top_logprobs=3))
        assert proxy.posts == 1
        again = CachedChatModel(backend(proxy.base_url), tmp_path / "cache").complete(paris(max_tokens=4, top_logprobs=3))
        assert proxy.posts == 1 and proxy.gets == 1  # a fresh backend, but the cache answered before any check
        assert again == first and isinstance(again, ChatResponse)
    assert API_KEY not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_transient_failures_are_retried_with_growing_back_off(llama_server: LlamaServer, key: str) -> None:
    faults = [("status", 503, 0), ("status", 503, 0), ("drop",), ("hang", 3.0)]
    with FaultyProxy(server_root(llama_server.base_url), faults) as proxy:
        delays = Delays()
        answer = backend(proxy.base_url, backoff=0.5, timeout=2.0, sleep=delays).complete(paris(max_tokens=4))
        assert answer.text and proxy.posts == 5
        assert delays == [0.5, 1.0, 2.0, 4.0]  # Retry-After: 0 asks for no longer than the back-off

        proxy.faults[:] = [("status", 429, 3), ("status", 503, None)]
        delays = Delays()
        backend(proxy.base_url, backoff=0.5, sleep=delays).complete(paris(max_tokens=4))
        assert delays == [3.0, 1.0]  # a longer Retry-After is honoured

        proxy.faults[:] = [("status", 503, 0), ("status", 503, 0)]
        posts = proxy.posts
        with pytest.raises(LmscopeError) as err:
            backend(proxy.base_url, max_retries=1, sleep=Delays()).complete(paris(max_tokens=4))
        assert proxy.posts == posts + 2
        message = str(err.value)
        assert f"{proxy.base_url}/chat/completions" in message and "HTTP 503" in message and "max_retries" in message


# -- bad input: one sentence each ------------------------------------------------------------------------------


def test_unreachable_server(key: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    delays = Delays()
    with pytest.raises(LmscopeError, match="could not reach") as err:
        backend(url, sleep=delays).complete(paris())
    assert url in str(err.value) and "--base-url" in str(err.value) and delays == []  # refused is not retried


def test_wrong_or_missing_api_key(llama_server: LlamaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    with pytest.raises(LmscopeError, match=f"rejected the API key in {KEY_ENV}.*set {KEY_ENV} to a valid"):
        backend(llama_server.base_url).complete(paris())
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LmscopeError, match=f"{KEY_ENV} is not set; set it to a valid API key"):
        backend(llama_server.base_url).complete(paris())
    with pytest.raises(LmscopeError, match="pass api_key_env"):
        OpenAIChatModel(llama_server.base_url, MODEL_ALIAS, None).complete(paris())


def test_wrong_model_lists_the_served_ones(llama_server: LlamaServer, key: str) -> None:
    with pytest.raises(LmscopeError, match=f"model 'gpt-4o' is not served at .*it serves: {MODEL_ALIAS}"):
        OpenAIChatModel(llama_server.base_url, "gpt-4o", KEY_ENV).complete(paris())


def test_base_url_without_v1(llama_server: LlamaServer, key: str) -> None:
    with pytest.raises(LmscopeError, match=r"not the base of an OpenAI-compatible API.*ends in /v1"):
        backend(server_root(llama_server.base_url) + "/").complete(paris())


def test_not_found_not_json_and_no_logprobs(llama_server: LlamaServer, key: str) -> None:
    no_logprobs = {"choices": [{"message": {"role": "assistant", "content": "Paris"}, "logprobs": None, "finish_reason": "stop"}]}
    faults = [("body", 200, b"<html><body>Welcome to nginx!</body></html>"), ("status", 404, None),
              ("body", 200, json.dumps(no_logprobs).encode())]
    with FaultyProxy(server_root(llama_server.base_url), faults) as proxy:
        model = backend(proxy.base_url)
        with pytest.raises(LmscopeError, match=r"answered something that is not JSON \('<html><body>Welcome"):
            model.complete(paris())
        with pytest.raises(LmscopeError, match=r"/chat/completions was not found \(HTTP 404.*check --base-url"):
            model.complete(paris())
        with pytest.raises(LmscopeError, match="without log-probabilities although the request asked for them"):
            model.complete(paris(top_logprobs=5))


def test_identity_names_no_key(key: str) -> None:
    model = OpenAIChatModel("http://127.0.0.1:8000/v1/", MODEL_ALIAS, KEY_ENV)
    assert model.identity == {"backend": "openai-chat", "base_url": "http://127.0.0.1:8000/v1", "model": MODEL_ALIAS}
    with pytest.raises(LmscopeError, match="not an http"):
        OpenAIChatModel("127.0.0.1:8000/v1", MODEL_ALIAS)


# -- the explain job through the server --------------------------------------------------------------------


def test_explain_job_through_the_server_writes_a_generated_simulation(llama_server: LlamaServer, key: str, tmp_path) -> None:
    """The whole job on a server backend: explanations, the generated simulator (the server writes the table), scores."""
    import pyarrow.parquet as pq

    from explain_fixtures import explain_store
    from lmscope.explain.job import ExplainSettings, run_explain
    from lmscope.explain.records import RecordSettings, UnitSource
    from lmscope.explain.scoring import simulate

    setup = explain_store(tmp_path / "store")
    model = CachedChatModel(backend(llama_server.base_url, concurrency=2), tmp_path / "cache")
    settings = ExplainSettings(n=2, records=RecordSettings(window=4, after=1, top=1, quantile=0, random=1, quiet=1))
    summary = run_explain(model, UnitSource(setup["store"], "resid"), tmp_path / "out", settings)
    assert len(summary["units"]) == 2 and all(text for text in summary["explanations"].values())
    rows = pq.read_table(tmp_path / "out" / "explanations.parquet").to_pylist()
    for row in rows:
        entry = json.loads((tmp_path / "out" / "units" / f"neuron-{row['unit']}.json").read_text())
        assert entry["scores"]["simulation_method"] == "generated"
        lines = sum(len(r["tokens"]) for r in entry["records"]["holdout"] + entry["records"]["random"])
        assert 0 <= entry["scores"]["simulation_unparsed"] <= lines
        assert all(0 <= v <= 10 for p in entry["scores"]["predicted"] for v in p)
    # Plain words: the server writes the table itself. SmolLM2-135M rarely keeps to the table when it writes freely
    # (it continues the story instead), so lines it leaves out count as unparsed and predict 0; the forced local
    # simulator exists for such small models. How lines are read is checked on a hand-built answer in test_explain.py.
    from lmscope.explain.records import ActivationRecord

    record = ActivationRecord("top", ["The", " cat", " sat"], [0.0, 1.0, 0.0], 0, 0)
    result = simulate(model, "the word cat", "neuron", [record])
    assert result.method == "generated" and result.predicted[0].shape == (3,) and 0 <= result.unparsed <= 3
    assert result.unparsed < 3 or not result.predicted[0].any()
