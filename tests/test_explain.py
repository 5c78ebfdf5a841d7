"""Automated explanations against independent truth: records against a brute force over the store, the local
backend against Hugging Face's own generate and full forward passes, scores against scipy's definitions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from explain_fixtures import explain_store, tiny_chat_model
from lmscope.errors import LmscopeError
from lmscope.explain.backend import CachedChatModel, ChatResponse, TokenLogprob, chat
from lmscope.explain.job import ExplainSettings, derangement, run_explain
from lmscope.explain.records import ActivationRecord, RecordSettings, UnitSource, choose_units, discretise, unit_records
from lmscope.explain.scoring import auroc, balanced_accuracy, correlation, expected_values, parse_simulation, yes_probability
from lmscope.sae.model import SaeShape, SparseAutoencoder
from lmscope.suites.replay import MiniSuiteSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return explain_store(tmp_path_factory.mktemp("explain"))


# --- records ------------------------------------------------------------------------------------------------


def test_discretise_is_openais_scale() -> None:
    assert discretise([0.0, 1.0, 2.0, -3.0, 0.94, 0.96], 2.0) == [0, 5, 10, 0, 5, 5]
    assert discretise([0.04, 0.06], 1.0) == [0, 1]
    assert discretise([1.0, 2.0], 0.0) == [0, 0]


def test_records_are_the_top_contexts_with_their_windows_and_provenance(setup: dict) -> None:
    store, suite = setup["store"], setup["suite"]
    settings = RecordSettings(window=6, after=2, top=2, quantile=1, random=2, quiet=2, seed=3)
    source = UnitSource(store, "resid")
    records = unit_records(source, [0, 5], settings, replay=MiniSuiteSource(suite.root))
    x = store.rows("resid", slice(None)).numpy()
    context = store.metadata["context"]
    for unit, rec in zip([0, 5], records):
        a = x[:, unit]
        assert rec.max_activation == pytest.approx(a.max()) and rec.density == pytest.approx((a > 0).mean())
        maxima = {int(c): a[context == c].max() for c in np.unique(context)}
        by_max = sorted(maxima, key=lambda c: (-maxima[c], list(maxima).index(c)))
        firing = [c for c in by_max if maxima[c] > 0]
        assert [r.context for r in rec.explain if r.kind == "top"] == firing[0:4:2]
        assert [r.context for r in rec.holdout if r.kind == "top"] == firing[1:4:2]
        shown = {r.context for r in rec.explain} | {r.context for r in rec.holdout}
        assert len(shown) == len(rec.explain) + len(rec.holdout)  # nothing held out was shown
        for r in rec.explain + rec.holdout + rec.random + rec.quiet:
            rows = np.arange(r.first_row, r.first_row + len(r.tokens))
            assert (context[rows] == r.context).all() and len(r.tokens) <= 6
            np.testing.assert_allclose(r.activations, a[rows], rtol=1e-6)
            assert r.tokens == [str(int(t)) for t in store.metadata["token"][rows]]
            peak = rows[int(np.argmax(a[rows]))]
            assert r.position == int(store.metadata["position"][peak])
            if r.kind in ("top", "quantile"):
                assert a[rows].max() == pytest.approx(maxima[r.context])  # the window holds the context's maximum
            doc = int(store.metadata["doc_index"][peak])
            assert r.doc_id == suite.doc_ids[doc] and r.domain == suite.domains[doc]
            if r.position >= 0:
                truth = sorted({step for step, *_ in suite.expected_steps(doc, r.position, r.position + 1)})
                assert r.steps_seen == truth
        assert not shown & {r.context for r in rec.random + rec.quiet}
        quiet_max = sorted(maxima[r.context] for r in rec.quiet)
        others = sorted(maxima[c] for c in maxima if c not in shown | {r.context for r in rec.random})
        assert quiet_max == others[: len(quiet_max)] or all(m < 0.05 * rec.max_activation for m in quiet_max)
    # the token detector (unit 0) has zero-scale contexts, so its quiet records are those
    assert all(max(r.activations) < 0.05 * records[0].max_activation for r in records[0].quiet)
    again = unit_records(source, [0, 5], settings, replay=MiniSuiteSource(suite.root))
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]


def test_feature_activations_are_the_saes_encoding(setup: dict) -> None:
    store = setup["store"]
    sae = SparseAutoencoder(SaeShape(d_in=8, width=12, arch="relu", hook="resid"), seed=3)
    with torch.no_grad():
        sae.input_scale.fill_(0.8)
    source = UnitSource(store, "resid", sae)
    truth = sae.encode(store.rows("resid", slice(None)) * 0.8).detach()[:, [2, 7]]
    torch.testing.assert_close(source.activations([2, 7], batch_size=37), truth)
    maximum, density = source.firing(batch_size=50)
    full = sae.encode(store.rows("resid", slice(None)) * 0.8).detach()
    np.testing.assert_allclose(maximum, full.max(0).values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(density, (full > 0).double().mean(0).numpy())
    with pytest.raises(LmscopeError, match="has width 8 in the store but the SAE reads 9"):
        UnitSource(store, "resid", SparseAutoencoder(SaeShape(d_in=9, width=4, arch="relu", hook="resid")))
    with pytest.raises(LmscopeError, match="has no hook 'blocks.0.mlp.hook_post'"):
        UnitSource(store, "blocks.0.mlp.hook_post")


def test_unit_draw_respects_density_and_seed(setup: dict) -> None:
    source = UnitSource(setup["store"], "resid")
    units, maximum, density = choose_units(source, 3, seed=1, min_density=0.1, max_density=0.6)
    assert len(units) == 3 and all(0.1 <= density[u] <= 0.6 for u in units)
    assert units == choose_units(source, 3, seed=1, min_density=0.1, max_density=0.6)[0]
    with pytest.raises(LmscopeError, match="no neuron of resid fires"):
        choose_units(source, 3, min_density=0.99, max_density=1.0)
    with pytest.raises(LmscopeError, match=r"units \[8\] are not in 0 … 7"):
        choose_units(source, 3, units=[1, 8])


# --- scoring ------------------------------------------------------------------------------------------------


def test_scores_equal_their_textbook_definitions() -> None:
    rng = np.random.default_rng(0)
    truth = [rng.normal(size=7), rng.normal(size=5)]
    predicted = [t * 0.5 + rng.normal(size=len(t)) for t in truth]
    assert correlation(truth, predicted) == pytest.approx(scipy.stats.pearsonr(np.concatenate(truth), np.concatenate(predicted))[0])
    assert math.isnan(correlation([[1.0, 1.0]], [np.array([0.0, 1.0])]))
    labels = [True, True, True, False, False]
    p = [0.9, 0.4, 0.7, 0.2, 0.6]
    assert balanced_accuracy(labels, p) == pytest.approx((2 / 3 + 1 / 2) / 2)
    u = scipy.stats.mannwhitneyu([0.9, 0.4, 0.7], [0.2, 0.6]).statistic
    assert auroc(labels, p) == pytest.approx(u / 6)
    assert auroc([True, False], [0.5, 0.5]) == 0.5
    assert math.isnan(balanced_accuracy([True, True], [0.9, 0.1]))
    np.testing.assert_allclose(expected_values(np.array([[0.5] + [0] * 9 + [0.5], [0] * 11])), [5.0, 0.0])


def _token(text: str, top: dict[str, float] | None = None) -> TokenLogprob:
    top = top or {text: 0.0}
    return TokenLogprob(text, top.get(text, -1.0), top)


def test_a_generated_table_is_read_from_its_top_logprobs() -> None:
    half = math.log(0.5)
    tokens = [
        _token("The"), _token("\t"), _token("0", {"0": half, "3": half}), _token("\n"),
        _token(" cat"), _token("\t"), _token("1", {"1": math.log(0.8), "2": math.log(0.2)}), _token("0", {"0": math.log(0.75), "\n": math.log(0.25)}),
        _token("\n"), _token(" sat"), _token("\n"),  # a line without a value
    ]
    response = ChatResponse("".join(t.token for t in tokens), tuple(tokens), "stop")
    values, missing = parse_simulation(response, 4)
    # line 1: E = 0.5·0 + 0.5·3; line 2: P(10) = 0.8·0.75, P(1) = 0.8·0.25, P(2) = 0.2
    np.testing.assert_allclose(values, [1.5, 0.8 * 0.75 * 10 + 0.8 * 0.25 + 0.2 * 2, 0.0, 0.0])
    assert missing == 2
    plain = ChatResponse("a\t3\nb\t12\nc\n", (), "stop")
    values, missing = parse_simulation(plain, 3)
    np.testing.assert_allclose(values, [3.0, 10.0, 0.0]) and missing == 1


def test_yes_probability_reads_both_answers() -> None:
    response = ChatResponse("Yes", (TokenLogprob("Yes", math.log(0.6), {"Yes": math.log(0.6), " no": math.log(0.2), "Maybe": -1.0}),))
    assert yes_probability(response) == pytest.approx(0.75)
    assert yes_probability(ChatResponse("No.", ())) == 0.0
    assert yes_probability(ChatResponse("Perhaps", (TokenLogprob("Perhaps", 0.0, {"Perhaps": 0.0}),))) == 0.5


def test_derangement_moves_every_unit() -> None:
    for seed in range(20):
        perm = derangement(5, seed)
        assert sorted(perm) == list(range(5)) and all(perm[i] != i for i in range(5))
    with pytest.raises(LmscopeError, match="at least two units"):
        derangement(1, 0)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(LmscopeError, match="role 'robot'"):
        chat(("robot", "hi"))
    with pytest.raises(LmscopeError, match="top_logprobs 30"):
        chat(("user", "hi"), top_logprobs=30)
    with pytest.raises(LmscopeError, match="max_tokens 0"):
        chat(("user", "hi"), max_tokens=0)
    with pytest.raises(LmscopeError, match="window must be >= 2"):
        RecordSettings(window=1)


# --- the local backend (a tiny random Llama with SmolLM2's tokenizer) ---------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    from lmscope.explain.local import LocalChatModel

    directory = tmp_path_factory.mktemp("tiny-chat")
    model, tokenizer = tiny_chat_model(directory)
    return LocalChatModel(model, tokenizer, str(directory), batch_size=3), directory


@pytest.mark.default_model
def test_batched_greedy_answers_equal_transformers_generate_and_full_forwards(local) -> None:
    chat_model, _ = local
    model, tokenizer = chat_model.model, chat_model.tokenizer
    requests = [chat(("user", "What is the capital of France?"), max_tokens=9, top_logprobs=4),
                chat(("system", "Be brief."), ("user", "Name a colour, please, and then a number."), max_tokens=6, top_logprobs=2),
                chat(("user", "Hello"), max_tokens=1, top_logprobs=5),
                chat(("user", "Count to ten."), max_tokens=7, top_logprobs=1)]
    answers = chat_model.complete_many(requests)  # batches of 3: one batch of 3 rows, then one of 1
    for request, answer in zip(requests, answers):
        ids = torch.tensor([chat_model.prompt_ids(request)])
        truth = model.generate(ids, max_new_tokens=request.max_tokens, do_sample=False, eos_token_id=sorted(chat_model.end_ids),
                               pad_token_id=chat_model.pad_id)[0, ids.shape[1]:].tolist()
        truth = [t for t in truth if t not in chat_model.end_ids]
        assert answer.text == tokenizer.decode(truth)
        assert answer.finish_reason == ("length" if len(truth) == request.max_tokens else "stop")
        with torch.no_grad():  # brute force: one full forward over prompt + answer, no cache, no padding
            logprobs = torch.log_softmax(model(torch.tensor([ids[0].tolist() + truth])).logits[0].float(), dim=-1)
        for i, token in enumerate(answer.tokens):
            row = logprobs[ids.shape[1] - 1 + i]
            assert token.logprob == pytest.approx(float(row[truth[i]]), abs=1e-4)
            values, indices = row.topk(request.top_logprobs)
            assert sorted(token.top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4) or \
                len(token.top) < request.top_logprobs  # two ids decoding alike share one entry
    stopped = chat_model.complete(chat(("user", "What is the capital of France?"), max_tokens=9, top_logprobs=1,
                                       stop=(answers[0].text[3:5],)))
    assert stopped.text == answers[0].text[: answers[0].text.find(answers[0].text[3:5])] and stopped.finish_reason == "stop"


@pytest.mark.default_model
def test_forced_digit_distributions_equal_a_full_forward_per_line(local) -> None:
    chat_model, _ = local
    model = chat_model.model
    request = chat(("system", "Predict."), ("user", "Description: commas."), top_logprobs=20)
    lines = [["The", " cat", ",", " sat"], ["x"], [" a", "\\n", " b"]]
    got = chat_model.forced_digit_distributions(request, lines)
    digits = [chat_model.encode(str(d))[0] for d in range(10)]
    prompt = chat_model.prompt_ids(request)
    for record, dist in zip(lines, got):
        assert dist.shape == (len(record), 11)
        written: list[int] = []
        ids = list(prompt)
        for step, token in enumerate(record):
            ids += chat_model.encode(("" if step == 0 else f"{written[-1]}\n") + f"{token}\t")
            with torch.no_grad():
                first = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[digits]
                ten = torch.softmax(model(torch.tensor([ids + [digits[1]]])).logits[0, -1].float(), -1)[digits[0]]
            p = torch.cat([first, first[1:2] * ten])
            p[1] = first[1] * (1 - ten)
            p = p / p.sum()
            torch.testing.assert_close(dist[step], p, atol=1e-5, rtol=1e-4)
            written.append(int(p.argmax()))
        assert torch.allclose(dist.sum(1), torch.ones(len(record)))


@pytest.mark.default_model
def test_explain_job_writes_scores_resumes_and_refuses_other_settings(setup: dict, local, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from lmscope.results.schema import COLUMNS

    chat_model, _ = local
    calls = {"n": 0}

    class Counting:
        identity = chat_model.identity

        def complete_many(self, requests):
            calls["n"] += len(requests)
            return chat_model.complete_many(requests)

        def forced_digit_distributions(self, request, lines):
            calls["n"] += 1
            return chat_model.forced_digit_distributions(request, lines)

    source = UnitSource(setup["store"], "resid")
    settings = ExplainSettings(n=3, records=RecordSettings(window=5, after=1, top=2, quantile=1, random=1, quiet=2), seed=2)
    out = tmp_path / "explain"

    class Killed(Exception):
        pass

    def kill_after_first(task: str, advance: int = 0, total: int | None = None, **fields: object) -> None:
        if task == "score" and fields:
            raise Killed

    with pytest.raises(Killed):
        run_explain(Counting(), source, out, settings, progress=kill_after_first)
    assert len(list((out / "units").glob("*.json"))) == 1
    summary = run_explain(Counting(), source, out, settings)
    assert len(summary["units"]) == 3
    first = calls["n"]
    again = run_explain(Counting(), source, out, settings)
    assert calls["n"] == first and again == summary  # finished units are read, not recomputed
    table = pq.read_table(out / "explanations.parquet").to_pylist()
    assert [r["unit"] for r in table] == summary["units"]
    for row in table:
        assert row["baseline_from"] != row["unit"] and row["baseline_explanation"] == summary["explanations"][str(row["baseline_from"])]
        assert -1 <= row["simulation"] <= 1 and 0 <= row["detection"] <= 1 and 0 <= row["fuzzing"] <= 1
    results = pq.read_table(out / "results.parquet")
    assert results.column_names[: len(COLUMNS)] == list(COLUMNS)
    rows = results.to_pylist()
    assert {r["metric"] for r in rows} <= {f"explain_{m}" for m in ("simulation", "detection", "detection_auroc", "fuzzing", "fuzzing_auroc")}
    assert {r["explanation_source"] for r in rows} == {"own", "shuffled"} and {r["unit_kind"] for r in rows} == {"neuron"}
    records = pq.read_table(out / "records.parquet").to_pylist()
    scored = [r for r in records if r["group"] in ("holdout", "random")]
    assert scored and all(len(r["predicted"]) == len(r["tokens"]) for r in scored)
    entry = json.loads((out / "units" / f"neuron-{table[0]['unit']}.json").read_text())
    assert entry["scores"]["simulation_method"] == "forced"
    with pytest.raises(LmscopeError, match="other settings"):
        run_explain(Counting(), source, out, ExplainSettings(n=4, records=settings.records, seed=2))
    with pytest.raises(LmscopeError, match="needs two or more"):
        run_explain(Counting(), source, tmp_path / "one", ExplainSettings(n=1, units=(0,)))


@pytest.mark.default_model
def test_answers_are_cached_by_full_request(local, tmp_path: Path) -> None:
    chat_model, _ = local
    cached = CachedChatModel(chat_model, tmp_path / "cache")
    request = chat(("user", "Hello"), max_tokens=3, top_logprobs=2)
    first = cached.complete_many([request, chat(("user", "Hi"), max_tokens=2)])
    assert cached.cache.misses == 2
    assert cached.complete(request) == first[0] and cached.cache.hits == 1
    assert cached.complete(chat(("user", "Hello"), max_tokens=4, top_logprobs=2)) != first[0]  # another request, another key
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3


@pytest.mark.default_model
def test_cli_explains_neurons_and_refuses_bad_input(setup: dict, local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from index_fixtures import run_cli

    _, directory = local
    store = setup["store"].root
    args = ["explain", "--neurons", "resid", "--store", str(store), "--explainer", str(directory), "--n", "2", "--window", "5",
            "--top", "1", "--quantile", "0", "--random", "1", "--quiet", "1", "--no-cache"]
    code, out, _ = run_cli(args + ["--out", str(tmp_path / "cli"), "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["kind"] == "neuron" and len(summary["units"]) == 2 and set(summary["median"]) >= {"simulation", "detection"}
    code, out, _ = run_cli(args + ["--out", str(tmp_path / "cli")], capsys)  # finished: read back, shown as a table
    assert code == 0 and "neurons of resid" in out and "median simulation" in out
    for bad, words in ((["--units", "1,99"], "not in 0 … 7"), (["--units", "a"], "comma-separated"),
                       (["--neurons", "nope"], "has no hook 'nope'")):
        code, _, err = run_cli(args + ["--out", str(tmp_path / "bad")] + bad, capsys)
        assert code == 2 and words in err, err
    code, _, err = run_cli(["explain", "--out", str(tmp_path / "x"), "--store", str(store)], capsys)
    assert code == 2 and "exactly one of --sae" in err
