"""Memorization: sampled sequences against the fixture's own rows, greedy decoding against HF ``generate``, rows by brute force."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.evals.memorization import (
    MemorizationResult,
    TrainedSequence,
    greedy_continuations,
    memorization_scores,
    result_rows,
    sample_trained_sequences,
)
from lmscope.suites.replay import open_source
from replay_fixtures import MiniSuite, build_mini_suite
from tiny_models import VOCAB, tiny_model

BATCH, STEPS, ROW = 4, 8, 64  # the suite below: 8 steps of 4 rows of 64 tokens (seq_len 63), plus 2 untrained rows


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """This module runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> MiniSuite:
    root = tmp_path_factory.mktemp("memorization")
    return build_mini_suite(root / "suite", root / "work", batch_size=BATCH, seq_len=ROW - 1, n_steps=STEPS)


def _truth_document(suite: MiniSuite, row: int, offset: int) -> tuple[str | None, str | None]:
    """(domain, doc_id) of the piece the fixture put at (row, offset), or (None, None) on a separator."""
    for r, row_offset, length, doc, _ in suite.pieces:
        if r == row and row_offset <= offset < row_offset + length:
            return suite.domains[doc], suite.doc_ids[doc]
    return None, None


# -- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, prefix_len, continuation_len", [(0, 32, 32), (5, 8, 8), (40, 12, 12)])
def test_sampled_sequences_are_the_rows_trained_at_their_step(suite: MiniSuite, offset: int, prefix_len: int, continuation_len: int) -> None:
    source = open_source(suite.root)
    assert source.num_steps == STEPS
    sequences = sample_trained_sequences(source, STEPS, seed=3, prefix_len=prefix_len, continuation_len=continuation_len, offset=offset)
    assert [s.step for s in sequences] == list(range(STEPS))
    named = 0
    for s in sequences:
        assert s.row in range(BATCH * s.step, BATCH * s.step + BATCH)
        assert s.offset == offset and s.tokens.dtype == np.int64
        assert s.tokens.tolist() == suite.rows[s.row][offset : offset + prefix_len + continuation_len]
        assert s.tokens.tolist() == suite.step_rows(s.step)[s.row - BATCH * s.step][offset : offset + prefix_len + continuation_len]
        assert (s.domain, s.doc_id) == _truth_document(suite, s.row, offset)
        named += s.domain is not None
    assert named >= STEPS // 2  # the domains are really looked up, not all left unknown


def test_steps_are_evenly_spread_and_rows_seeded(suite: MiniSuite) -> None:
    source = open_source(suite.root)
    for n in (1, 3, 5, 8):
        steps = [s.step for s in sample_trained_sequences(source, n, seed=1)]
        assert steps[0] == 0 and len(set(steps)) == n and steps == sorted(steps)
        gaps = {b - a for a, b in zip(steps, steps[1:])}
        assert gaps <= {STEPS // n, -(-STEPS // n)} and STEPS - 1 - steps[-1] < -(-STEPS // n)
    many = sample_trained_sequences(source, 20, seed=1)
    assert set(Counter(s.step for s in many).values()) == {2, 3} and len({(s.step, s.row) for s in many}) == 20
    everything = sample_trained_sequences(source, STEPS * BATCH, seed=5)
    assert sorted(s.row for s in everything) == list(range(STEPS * BATCH))  # every trained row once, never the 2 untrained ones
    only = sample_trained_sequences(source, 6, steps=range(2, 5))
    assert Counter(s.step for s in only) == {2: 2, 3: 2, 4: 2}

    again = [s.to_dict() for s in sample_trained_sequences(source, STEPS, seed=11)]
    assert again == [s.to_dict() for s in sample_trained_sequences(open_source(suite.root), STEPS, seed=11)]
    # Over seeds, every row of every step gets drawn: the row within a step is not fixed.
    drawn = {(s.step, s.row) for seed in range(40) for s in sample_trained_sequences(source, STEPS, seed=seed)}
    assert drawn == {(step, row) for step in range(STEPS) for row in range(BATCH * step, BATCH * step + BATCH)}


def test_sampling_reads_only_the_rows_it_returns(suite: MiniSuite) -> None:
    source = open_source(suite.root)
    reads: list[tuple[int, int, int]] = []
    real_read = source._read

    def spy(step: int, start: int, stop: int):
        reads.append((step, start, stop))
        return real_read(step, start, stop)

    source._read = spy
    sequences = sample_trained_sequences(source, 5, seed=2)
    assert sorted((step, BATCH * step + start) for step, start, stop in reads if stop == start + 1) == [(s.step, s.row) for s in sequences]
    assert len(reads) == 5


def test_sampling_bad_input(suite: MiniSuite) -> None:
    source = open_source(suite.root)
    cases = [
        (dict(prefix_len=40, continuation_len=40), "hold 64 tokens, fewer than offset"),
        (dict(offset=1), "hold 64 tokens, fewer than offset"),
        (dict(n_sequences=0), "n_sequences=0 must be an integer of at least 1"),
        (dict(n_sequences=33), "more than the 32 rows of the 8 step"),
        (dict(n_sequences=9, steps=[0, 1]), "pass at most 8"),
        (dict(prefix_len=0), "prefix_len=0 must be"),
        (dict(seed=-1), "seed=-1 must be"),
        (dict(steps=[]), "steps is empty"),
        (dict(steps=[3, 8]), "step 8 is beyond"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LmscopeError, match=message):
            sample_trained_sequences(source, **{"n_sequences": 4, **kwargs})
    with pytest.raises(LmscopeError, match="is not a replay source"):
        sample_trained_sequences(42)


# -- greedy decoding and scores --------------------------------------------------------------


def _sequences(n: int, prefix_len: int, continuation_len: int, seed: int = 0, vocab: int = VOCAB) -> list[TrainedSequence]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (n, prefix_len + continuation_len), generator=generator).numpy()
    return [TrainedSequence(step=i, row=10 + i, offset=0, tokens=tokens[i], domain="alpha" if i % 2 else None) for i in range(n)]


def _hf_greedy(model: torch.nn.Module, prefix: np.ndarray, n_tokens: int, **kwargs) -> list[int]:
    """HF's own greedy search on one prefix, without stopping at an EOS."""
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prefix)[None], do_sample=False, max_new_tokens=n_tokens, **kwargs)[0, len(prefix) :]
    assert len(out) == n_tokens
    return out.tolist()


def _no_eos(model: torch.nn.Module) -> torch.nn.Module:
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _varied(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw the weight matrices at std 0.2: at HF's init scale a tiny model's greedy output hardly depends on its prefix."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("label", ["gpt_neox", "llama", "gpt2", "olmo2"])
def test_greedy_continuations_equal_hf_generate_one_at_a_time(label: str) -> None:
    model = _no_eos(_varied(tiny_model(label)))
    P, C = 12, 20
    sequences = _sequences(5, P, C, seed=1)
    results = memorization_scores(model, sequences, prefix_len=P, batch_size=2)
    assert len({tuple(r.generated.tolist()) for r in results}) == 5  # not one output for every prefix
    for s, r in zip(sequences, results):
        expected = _hf_greedy(model, s.tokens[:P], C)
        assert r.generated.tolist() == expected
        matches = sum(int(a == b) for a, b in zip(expected, s.tokens[P:].tolist()))
        assert (r.matches, r.continuation_len, r.score, r.extractable) == (matches, C, matches / C, matches == C)
        assert (r.step, r.row, r.offset, r.domain) == (s.step, s.row, s.offset, s.domain)


def test_own_continuation_is_extractable_and_altered_positions_count() -> None:
    model = _no_eos(_varied(tiny_model("gpt_neox")))
    P, C = 16, 24
    base = _sequences(4, P, C, seed=2)
    own = [TrainedSequence(s.step, s.row, 0, np.concatenate([s.tokens[:P], _hf_greedy(model, s.tokens[:P], C)]).astype(np.int64)) for s in base]
    altered_at = [0, 5, 11, C - 1]
    altered = []
    for k, s in enumerate(own):
        tokens = s.tokens.copy()
        for j in altered_at[: k + 1]:  # sequence k has k + 1 continuation tokens changed
            tokens[P + j] = (tokens[P + j] + 1) % VOCAB
        altered.append(TrainedSequence(s.step, s.row, 0, tokens))
    results = memorization_scores(model, own + altered, prefix_len=P, batch_size=3)
    for r in results[:4]:
        assert (r.score, r.matches, r.extractable) == (1.0, C, True)
    for k, r in enumerate(results[4:]):
        assert (r.score, r.matches, r.extractable) == ((C - k - 1) / C, C - k - 1, False)
        assert r.generated.tolist() == results[k].generated.tolist()  # the truth changed, not the model's output


def test_batch_size_invariant_repeatable_and_hooked_model() -> None:
    from lmscope.models.hooks import HookedModel

    model = _varied(tiny_model("gpt2"))  # GPT-2 has dropout, so train mode would change its output
    sequences = _sequences(7, 10, 14, seed=3)
    reference = [r.to_dict() for r in memorization_scores(model, sequences, prefix_len=10, batch_size=1)]
    assert len({tuple(r["generated"]) for r in reference}) == 7  # the prefixes lead to different continuations
    for batch_size in (5, 7, 16):
        assert [r.to_dict() for r in memorization_scores(model, sequences, prefix_len=10, batch_size=batch_size)] == reference
    assert [r.to_dict() for r in memorization_scores(model, sequences, prefix_len=10, batch_size=5)] == reference
    assert [r.to_dict() for r in memorization_scores(HookedModel(model), sequences, prefix_len=10)] == reference
    model.train()
    ids = torch.from_numpy(np.stack([s.tokens for s in sequences]))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live in train mode
    assert [r.to_dict() for r in memorization_scores(model, sequences, prefix_len=10, batch_size=4)] == reference  # and off for the call
    assert model.training  # the mode is given back


def test_suppressed_token_reproduces_pythia_min_length() -> None:
    """Pythia's script ran generate(min_length=P + C), which bars EOS from the whole continuation."""
    model = _varied(tiny_model("olmo"))
    P, C = 8, 16
    sequences = _sequences(6, P, C, seed=4)
    free = memorization_scores(model, sequences, prefix_len=P)
    eos = Counter(t for r in free for t in r.generated.tolist()).most_common(1)[0][0]  # a token greedy search does emit
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    barred = memorization_scores(model, sequences, prefix_len=P, batch_size=4, suppress_tokens=[eos])
    for s, r in zip(sequences, barred):
        assert r.generated.tolist() == _hf_greedy(model, s.tokens[:P], C, min_new_tokens=C)
        assert eos not in r.generated.tolist()
    assert any(a.generated.tolist() != b.generated.tolist() for a, b in zip(free, barred))


def test_scoring_bad_input() -> None:
    model = tiny_model("gpt_neox")
    sequences = _sequences(3, 8, 8)
    mixed = sequences[:2] + [TrainedSequence(9, 9, 0, np.arange(3, 20, dtype=np.int64))]
    outside = sequences[:1] + [TrainedSequence(4, 77, 0, np.full(16, VOCAB, dtype=np.int64))]
    cases = [
        ([], {}, "no sequences to score"),
        (mixed, dict(prefix_len=8), "different lengths \\(16, 17 tokens\\)"),
        (sequences, dict(prefix_len=16), "prefix_len=16 leaves no prefix or no continuation of the 16-token sequences; pass 1 to 15"),
        (sequences, dict(prefix_len=0), "prefix_len=0 leaves"),
        (sequences, dict(prefix_len=8, batch_size=0), "batch_size=0 must be"),
        (_sequences(2, 40, 40), dict(prefix_len=40), "feeds 79 positions, but the model takes at most 64"),
        (outside, dict(prefix_len=8), "step 4, row 77 holds token ids outside the model's vocabulary of 128"),
    ]
    for given, kwargs, message in cases:
        with pytest.raises(LmscopeError, match=message):
            memorization_scores(model, given, **kwargs)
    with pytest.raises(LmscopeError, match="n_tokens=0 must be"):
        greedy_continuations(model, torch.zeros((2, 4), dtype=torch.long), 0)
    with pytest.raises(LmscopeError, match="are not \\[n, P\\]"):
        greedy_continuations(model, torch.zeros(4, dtype=torch.long), 3)


# -- rows --------------------------------------------------------------------------------


def _result(step: int, matches: int, domain: str | None, C: int = 4) -> MemorizationResult:
    return MemorizationResult(step=step, row=100 + step, offset=0, domain=domain, doc_id=None,
                              generated=np.zeros(C, dtype=np.int64), matches=matches, continuation_len=C, score=matches / C)


RESULTS = [_result(0, 4, "alpha"), _result(1, 1, None), _result(2, 4, "beta"), _result(5, 2, "alpha"), _result(7, 4, None), _result(2, 0, "beta")]


@pytest.mark.parametrize("checkpoint", [0, 1, 3, 6, 8, None])
def test_result_rows_split_seen_and_summarise_by_brute_force(checkpoint: int | None) -> None:
    rows = result_rows(RESULTS, suite="s", model="m", revision=None if checkpoint is None else f"step{checkpoint}", step=checkpoint)
    per_sequence = [row for row in rows if row["metric"] == "memorization_score"]
    assert len(per_sequence) == len(RESULTS)
    for row, r in zip(per_sequence, RESULTS):
        seen = None if checkpoint is None else r.step < checkpoint
        assert row == {"suite": "s", "model": "m", "revision": None if checkpoint is None else f"step{checkpoint}", "step": checkpoint,
                       "metric": "memorization_score", "domain": r.domain or "all", "value": r.matches / 4, "step_seen": r.step,
                       "row": 100 + r.step, "seen": seen, "extractable": r.matches == 4}
    summary = {row["metric"]: row for row in rows if row["metric"] != "memorization_score"}
    counted = [(r.matches, r.step) for r in RESULTS if checkpoint is None or r.step < checkpoint]
    if not counted:
        assert summary == {}
        return
    mean = sum(m / 4 for m, _ in counted) / len(counted)
    fraction = sum(1 for m, _ in counted if m == 4) / len(counted)
    assert set(summary) == {"memorization_mean", "k_extractable_fraction"}
    assert summary["memorization_mean"]["value"] == pytest.approx(mean, abs=1e-15)
    assert summary["k_extractable_fraction"]["value"] == pytest.approx(fraction, abs=1e-15)
    for row in summary.values():
        assert (row["domain"], row["sequences"], row["seen"], row["step"]) == ("all", len(counted), None if checkpoint is None else True, checkpoint)
    if checkpoint == 3:  # steps 0, 1, 2, 2 seen: scores 1, 0.25, 1, 0
        assert (summary["memorization_mean"]["value"], summary["k_extractable_fraction"]["value"]) == (0.5625, 0.5)


def test_result_rows_fit_the_results_schema(tmp_path: Path) -> None:
    from lmscope.results.query import query_results
    from lmscope.results.schema import write_results

    at_step = write_results(result_rows(RESULTS, model="m", step=3, tokens_seen=300), tmp_path / "a.parquet")
    no_step = write_results(result_rows(RESULTS, model="m"), tmp_path / "b.parquet")  # its "seen" column is all null
    (row,) = query_results("SELECT value, sequences, seen FROM results WHERE metric = 'memorization_mean' AND step = 3", [tmp_path]).to_pylist()
    assert row == {"value": 0.5625, "sequences": 4, "seen": True}
    seen = query_results("SELECT step_seen, extractable FROM results WHERE metric = 'memorization_score' AND seen ORDER BY step_seen", [tmp_path]).to_pylist()
    assert seen == [{"step_seen": s, "extractable": e} for s, e in [(0, True), (1, False), (2, True), (2, False)]]
    (count,) = query_results("SELECT count(*) AS n FROM results WHERE step IS NULL AND seen IS NULL", [tmp_path]).to_pylist()
    assert count["n"] == len(RESULTS) + 2
    combined = pa.concat_tables([pq.read_table(at_step), pq.read_table(no_step)], promote_options="default")  # as the sweep does
    assert combined.schema.field("seen").type == pa.bool_() and combined.schema.field("step_seen").type == pa.int64()


# -- end to end --------------------------------------------------------------------------


def test_a_model_trained_on_its_rows_memorizes_them_and_the_control_stays_low(suite: MiniSuite) -> None:
    """Overfit a tiny model on the rows of steps 0-1, as checkpoint step2 has seen them: those become extractable.

    Of the sequences it has not seen, the ones whose tokens occur verbatim in a trained row (the
    test corpus repeats its sentences) are reproduced too; the others mostly are not.
    """
    source = open_source(suite.root)
    model = tiny_model("llama", vocab_size=1 + max(max(row) for row in suite.rows))
    trained_rows = suite.rows[: 2 * BATCH]
    trained = torch.tensor(trained_rows, dtype=torch.long)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=trained, labels=trained).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    sequences = sample_trained_sequences(source, 16, seed=0, prefix_len=16, continuation_len=16)
    results = memorization_scores(model, sequences, prefix_len=16, batch_size=8)

    def in_trained_rows(tokens: list[int]) -> bool:
        return any(row[i : i + len(tokens)] == tokens for row in trained_rows for i in range(len(row) - len(tokens) + 1))

    seen = [r for r in results if r.step < 2]
    repeated = [r for s, r in zip(sequences, results) if s.step >= 2 and in_trained_rows(s.tokens.tolist())]
    novel = [r for s, r in zip(sequences, results) if s.step >= 2 and not in_trained_rows(s.tokens.tolist())]
    assert len(seen) == 4 and all(r.extractable for r in seen)
    assert all(r.extractable for r in repeated)
    assert len(novel) >= 8 and np.mean([r.score for r in novel]) < 0.6 and sum(r.extractable for r in novel) <= 2
    rows = result_rows(results, model="tiny", step=2)
    summary = {row["metric"]: (row["value"], row["sequences"]) for row in rows if row["metric"] != "memorization_score"}
    assert summary == {"memorization_mean": (1.0, 4), "k_extractable_fraction": (1.0, 4)}
    assert sum(bool(row["seen"]) for row in rows if row["metric"] == "memorization_score") == 4
