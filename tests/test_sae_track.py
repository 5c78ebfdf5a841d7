"""Feature tracking across checkpoints, against brute force and hand-built timelines.

Matching is checked against an exhaustive search over all one-to-one pairings and against the
definition of mutual nearest neighbours; the lineage timeline against a three-checkpoint story
written out by hand. The end-to-end run on a trained suite is in tests/test_suite_train.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.report import readings
from lmscope.report.plots import plot_feature_track, plot_lineage_density
from lmscope.sae.model import SaeShape, SparseAutoencoder
from lmscope.sae.track import (
    CheckpointFeatures,
    decoder_cosines,
    fresh_dead_latents,
    lineage_timeline,
    match_features,
    pick_lineages,
    summary_result_rows,
    track_summary,
)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True)


def _brute_force_assignment(sims: np.ndarray) -> float:
    """The largest total cosine over every one-to-one pairing of the smaller side into the larger."""
    n1, n2 = sims.shape
    if n1 <= n2:
        return max(sum(sims[i, p[i]] for i in range(n1)) for p in itertools.permutations(range(n2), n1))
    return max(sum(sims[p[j], j] for j in range(n2)) for p in itertools.permutations(range(n1), n2))


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_hungarian_matching_is_the_best_one_to_one_pairing(shape: tuple[int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape[0], 3, generator=g), torch.randn(shape[1], 3, generator=g)
    m = match_features(a, b, threshold=-1.0, method="hungarian")
    pairs = [(int(i), j) for j, i in enumerate(m.previous) if i >= 0]
    assert len(pairs) == min(shape) and len({i for i, _ in pairs}) == len(pairs)  # one to one, all matched
    sims = (_unit(a.double()) @ _unit(b.double()).T).numpy()
    assert sum(sims[i, j] for i, j in pairs) == pytest.approx(_brute_force_assignment(sims), abs=1e-12)
    for i, j in pairs:
        assert m.cosine[j] == pytest.approx(sims[i, j], abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_mutual_matching_is_the_definition_and_chunking_does_not_change_it(seed: int) -> None:
    from lmscope.sae.track import _mutual_nearest

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(9, 4, generator=g), torch.randn(7, 4, generator=g)
    sims = (_unit(a.double()) @ _unit(b.double()).T).numpy()
    expected = {(i, j) for i in range(9) for j in range(7) if sims[i].argmax() == j and sims[:, j].argmax() == i}
    m = match_features(a, b, threshold=-1.0, method="mutual")
    assert {(int(i), j) for j, i in enumerate(m.previous) if i >= 0} == expected
    idx_a, idx_b = np.arange(9), np.arange(7)
    assert _mutual_nearest(a, b, idx_a, idx_b, chunk=2) == _mutual_nearest(a, b, idx_a, idx_b, chunk=100)


def test_a_permuted_noisy_dictionary_is_matched_back_and_strangers_are_not() -> None:
    g = torch.Generator().manual_seed(0)
    before = _unit(torch.randn(64, 32, generator=g))
    perm = torch.randperm(64, generator=g)
    after = _unit(before[perm] + 0.05 * torch.randn(64, 32, generator=g))
    after[10] = _unit(torch.randn(1, 32, generator=g))[0]  # a new direction: nothing to match
    for method in ("hungarian", "mutual", "auto"):
        m = match_features(before, after, threshold=0.7, method=method)
        expected = perm.numpy().copy()
        expected[10] = -1
        assert np.array_equal(m.previous, expected), method
        assert np.isnan(m.cosine[10]) and (m.cosine[m.previous >= 0] > 0.9).all()


def test_dead_latents_are_never_matched() -> None:
    directions = torch.eye(4)
    m = match_features(directions, directions, previous_alive=np.array([1, 0, 1, 1], bool),
                       next_alive=np.array([1, 1, 0, 1], bool))
    assert m.previous.tolist() == [0, -1, -1, 3]


def _checkpoint(step: int, rows: list[list[float]], density: list[float]) -> CheckpointFeatures:
    return CheckpointFeatures(step, step * 100, torch.tensor(rows, dtype=torch.float32), np.array(density))


def test_lineages_of_a_hand_written_story() -> None:
    """Step 0: latents A=e0, B=e1, C=e2 fire, latent 3 is dead. Step 10: A moves to latent 1 and turns a little,
    B is latent 0, C is gone (latent 2 dead), latent 3 is new (e3). Step 20: everything stays, and B stops firing."""
    e = np.eye(4).tolist()
    turned = [math.cos(0.3), 0, 0, math.sin(0.3)]  # e0 turned by 0.3 rad towards e3: cosine 0.955
    ckpts = [
        _checkpoint(0, [e[0], e[1], e[2], e[3]], [0.1, 0.2, 0.3, 0.0]),
        _checkpoint(10, [e[1], turned, e[2], e[3]], [0.2, 0.1, 0.0, 0.05]),
        _checkpoint(20, [e[1], turned, e[2], e[3]], [0.0, 0.15, 0.0, 0.05]),
    ]
    timeline = lineage_timeline(ckpts, threshold=0.7)
    rows = [(r["step"], r["feature"], r["lineage"], r["event"], r["previous_feature"], r["continues"]) for r in timeline.to_pylist()]
    assert rows == [
        (0, 0, 0, "start", None, True), (0, 1, 1, "start", None, True), (0, 2, 2, "start", None, False),
        (10, 0, 1, "continued", 1, False), (10, 1, 0, "continued", 0, True), (10, 3, 3, "born", None, True),
        (20, 1, 0, "continued", 1, None), (20, 3, 3, "continued", 3, None),
    ]
    by = {(r["step"], r["feature"]): r for r in timeline.to_pylist()}
    assert by[(10, 1)]["cosine_previous"] == pytest.approx(math.cos(0.3))
    assert by[(20, 1)]["cosine_previous"] == pytest.approx(1.0) and by[(20, 1)]["cosine_birth"] == pytest.approx(math.cos(0.3))
    assert by[(10, 3)]["density"] == 0.05 and by[(10, 3)]["tokens_seen"] == 1000

    summary = track_summary(timeline, [(c.step, c.tokens_seen) for c in ckpts], width=4).to_pylist()
    assert [(s["alive"], s["matched"], s["born"], s["died"]) for s in summary] == [(3, 0, 0, 0), (3, 2, 1, 1), (2, 2, 0, 1)]
    assert summary[1]["cosine_median"] == pytest.approx((1 + math.cos(0.3)) / 2) and summary[0]["cosine_median"] is None
    # lineage 0 spans three checkpoints; 1 and 3 span two, and 1 ends denser (0.2 against 0.05)
    assert pick_lineages(timeline, 2) == [0, 1]
    rows = summary_result_rows(track_summary(timeline, [(c.step, c.tokens_seen) for c in ckpts], width=4),
                               [{"model": "m", "step": c.step} for c in ckpts], hook="h")
    assert {(r["step"], r["metric"]): r["value"] for r in rows}[(10, "sae_track_died")] == 1.0
    assert all(r["hook"] == "h" for r in rows) and (0, "sae_track_cosine_median") not in {(r["step"], r["metric"]) for r in rows}
    reading = readings.feature_track(summary)
    assert "3 fire at step 0 and 2 at step 20" in reading and "2 lineages were born" not in reading
    assert "1 lineages were born and 2 died" in reading


def test_track_plots_draw(tmp_path) -> None:
    e = np.eye(3).tolist()
    ckpts = [_checkpoint(0, e, [0.1, 0.2, 0.0]), _checkpoint(8, e, [0.1, 0.3, 0.4])]
    timeline = lineage_timeline(ckpts)
    summary = track_summary(timeline, [(0, 0), (8, 800)], width=3)
    assert plot_feature_track(summary, tmp_path / "t.png").stat().st_size > 1000
    assert plot_lineage_density(timeline, [0, 1, 2], tmp_path / "l.png").stat().st_size > 1000
    with pytest.raises(LmscopeError, match="not in the timeline"):
        plot_lineage_density(timeline, [99], tmp_path / "x.png")
    with pytest.raises(LmscopeError, match="at least two checkpoints"):
        plot_feature_track(summary.slice(0, 1), tmp_path / "y.png")


def test_fresh_dead_latents_replaces_only_the_dead() -> None:
    shape = SaeShape(d_in=6, width=5, arch="topk", k=2)
    trained = {name: value + 1.0 for name, value in SparseAutoencoder(shape, seed=3).state_dict().items()
               if name not in ("input_scale", "output_scale")}
    alive = np.array([1, 0, 1, 1, 0], bool)
    out = fresh_dead_latents(trained, alive, shape, seed=9)
    fresh = SparseAutoencoder(shape, seed=9)
    for j in range(5):
        source = trained if alive[j] else {"W_enc": fresh.W_enc.detach(), "W_dec": fresh.W_dec.detach(), "b_enc": fresh.b_enc.detach()}
        assert torch.equal(out["W_enc"][:, j], source["W_enc"][:, j]) and torch.equal(out["W_dec"][j], source["W_dec"][j])
        assert torch.equal(out["b_enc"][j], source["b_enc"][j])
    assert torch.equal(out["b_dec"], trained["b_dec"])
    assert torch.equal(trained["W_dec"][1], SparseAutoencoder(shape, seed=3).W_dec.detach()[1] + 1.0)  # input untouched


def test_bad_inputs_are_refused_with_a_clear_sentence() -> None:
    a = torch.eye(3)
    with pytest.raises(LmscopeError, match="unknown"):
        match_features(a, a, method="greedy")
    with pytest.raises(LmscopeError, match="not a cosine"):
        match_features(a, a, threshold=1.5)
    with pytest.raises(LmscopeError, match="cannot be compared"):
        decoder_cosines(a, torch.eye(4))
    with pytest.raises(LmscopeError, match="do not fit"):
        match_features(a, a, previous_alive=np.ones(2, bool))
    with pytest.raises(LmscopeError, match="increasing step order"):
        lineage_timeline([_checkpoint(5, a.tolist(), [1, 1, 1]), _checkpoint(2, a.tolist(), [1, 1, 1])])
    with pytest.raises(LmscopeError, match="no checkpoints"):
        lineage_timeline([])
    empty = match_features(a, a, previous_alive=np.zeros(3, bool))
    assert (empty.previous == -1).all()
    assert isinstance(lineage_timeline([_checkpoint(0, a.tolist(), [0, 0, 0])]), pa.Table)
