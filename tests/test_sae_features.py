"""Feature statistics and examples against a brute force over every row, and training steps against the fixture's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmscope.activations import ActivationStore, iter_contexts, write_activations
from lmscope.errors import LmscopeError
from lmscope.sae.features import HISTOGRAM_EDGES, feature_report
from lmscope.sae.model import SaeShape, SparseAutoencoder
from lmscope.suites.replay import MiniSuiteSource
from replay_fixtures import build_mini_suite

D, WIDTH, CTX = 8, 12, 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lmscope.data.tokenized import TokenizedCorpus

    root = tmp_path_factory.mktemp("features")
    suite = build_mini_suite(root / "suite", root / "work", batch_size=4, seq_len=31, n_steps=6)
    corpus = TokenizedCorpus.open(root / "suite" / "corpus")
    vocab = int(max(max(t) for t in suite.doc_tokens.values())) + 1
    table = torch.randn(vocab, D, generator=torch.Generator().manual_seed(0))

    def capture(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"resid": table[ids] + 0.1 * torch.arange(ids.shape[1], dtype=torch.float32)[None, :, None]}

    docs = [(i, corpus.document_tokens(i)) for i in range(len(corpus))]
    info = {i: {"id": suite.doc_ids[i], "domain": suite.domains[i]} for i in range(len(corpus))}
    write_activations(capture, iter_contexts(docs, CTX, 600), ["resid"], root / "store", batch_size=4, shard_tokens=128,
                      documents=info)
    store = ActivationStore.open(root / "store")
    sae = SparseAutoencoder(SaeShape(d_in=D, width=WIDTH, arch="relu", hook="resid"), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
        sae.input_scale.fill_(0.8)
        sae.output_scale.fill_(0.8)
    acts = sae.encode(store.rows("resid", slice(None)) * 0.8).detach()
    return {"suite": suite, "store": store, "sae": sae, "acts": acts, "root": root}


def test_statistics_equal_a_brute_force_over_every_row(setup: dict) -> None:
    store, sae, acts = setup["store"], setup["sae"], setup["acts"]
    report = feature_report(sae, store, top_n=4, batch_size=37)
    stats = report.stats.to_pylist()
    assert [s["feature"] for s in stats] == list(range(WIDTH))
    for j, s in enumerate(stats):
        column = acts[:, j].double().numpy()
        fired = column > 0
        assert s["fired"] == int(fired.sum()) and s["density"] == pytest.approx(fired.mean())
        assert s["max_activation"] == pytest.approx(column.max(), rel=1e-6)
        assert s["mean_when_active"] == pytest.approx(column[fired].mean() if fired.any() else 0.0, rel=1e-6)
        expected_hist = np.histogram(np.log10(column[fired]), bins=HISTOGRAM_EDGES)[0]
        assert s["log10_histogram"] == expected_hist.tolist()
        # Top rows: largest activation first, ties to the lower row.
        order = sorted(range(len(column)), key=lambda r: (-column[r], r))[:4]
        tops = [e for e in report.examples.to_pylist() if e["feature"] == j and e["kind"] == "top"]
        assert [e["row"] for e in tops] == [r for r in order if column[r] > 0]


def test_examples_carry_their_context_document_and_interval(setup: dict) -> None:
    store, sae, acts = setup["store"], setup["sae"], setup["acts"]
    report = feature_report(sae, store, features=[0, 5], top_n=2, n_intervals=4, samples_per_interval=2, window=(3, 2),
                            batch_size=64)
    meta = store.metadata
    examples = report.examples.to_pylist()
    assert {e["feature"] for e in examples} == {0, 5}
    for e in examples:
        row = e["row"]
        assert e["activation"] == pytest.approx(float(acts[row, e["feature"]]), rel=1e-6)
        assert e["token"] == meta["token"][row] and e["context_tokens"][e["token_index"]] == e["token"]
        same = [r for r in range(max(0, row - 3), min(store.n_rows, row + 3)) if meta["context"][r] == meta["context"][row]]
        assert e["context_tokens"] == [int(meta["token"][r]) for r in same]
        assert e["doc_id"] == setup["suite"].doc_ids[e["doc_index"]] and e["domain"] == setup["suite"].domains[e["doc_index"]]
        if e["kind"].startswith("interval_"):
            b = int(e["kind"].split("_")[1])
            top = float(acts[:, e["feature"]].max())
            assert b / 4 * top <= e["activation"] * (1 + 1e-6) and (e["activation"] < (b + 1) / 4 * top * (1 + 1e-6) or b == 3)
    again = feature_report(sae, store, features=[0, 5], top_n=2, n_intervals=4, samples_per_interval=2, window=(3, 2),
                           batch_size=200)
    assert again.examples.equals(report.examples)  # batching changes neither the picks nor the priorities
    exact = ["feature", "fired", "max_activation", "log10_histogram"]
    assert again.stats.select(exact).equals(report.stats.select(exact))
    np.testing.assert_allclose(again.stats.column("mean_when_active").to_numpy(), report.stats.column("mean_when_active").to_numpy(),
                               rtol=1e-6)


def test_steps_seen_equal_the_suites_own_record(setup: dict) -> None:
    suite = setup["suite"]
    report = feature_report(setup["sae"], setup["store"], top_n=5, replay=MiniSuiteSource(suite.root))
    checked = 0
    for e in report.examples.to_pylist():
        if e["position"] < 0:
            assert e["steps_seen"] is None
            continue
        truth = sorted({step for step, *_ in suite.expected_steps(e["doc_index"], e["position"], e["position"] + 1)})
        assert e["steps_seen"] == truth
        checked += bool(truth)
    assert checked > 0, "some example tokens must have been trained on"
    assert all(e["steps_seen"] is None for e in feature_report(setup["sae"], setup["store"], top_n=2).examples.to_pylist())


def test_logit_effects_are_the_decoder_through_the_unembedding(setup: dict) -> None:
    sae = setup["sae"]
    unembed = torch.randn(30, D, generator=torch.Generator().manual_seed(9))
    stats = feature_report(sae, setup["store"], features=[2], unembedding=unembed, n_logit_tokens=3).stats.to_pylist()[0]
    effects = (sae.W_dec[2].detach() / 0.8) @ unembed.T
    assert stats["top_logit_tokens"] == effects.argsort(descending=True)[:3].tolist()
    assert stats["bottom_logit_tokens"] == effects.argsort()[:3].tolist()
    assert stats["top_logit_values"][0] == pytest.approx(float(effects.max()), rel=1e-5)
    # an SAE on a hook of another width than the residual stream (MLP neurons) has no direct logit effect
    other = torch.randn(30, D + 3)
    assert "top_logit_tokens" not in feature_report(sae, setup["store"], features=[2], unembedding=other).stats.column_names


def test_written_tables_and_bad_input(setup: dict, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    report = feature_report(setup["sae"], setup["store"], features=[1], top_n=2)
    stats_path, examples_path = report.write(tmp_path / "features")
    assert pq.read_table(stats_path).equals(report.stats) and pq.read_table(examples_path).equals(report.examples)
    with pytest.raises(LmscopeError, match="has no hook 'blocks.0.hook_mlp_out'"):
        feature_report(setup["sae"], setup["store"], hook="blocks.0.hook_mlp_out")
    with pytest.raises(LmscopeError, match="are not all in 0 … 11"):
        feature_report(setup["sae"], setup["store"], features=[12])
    other = SparseAutoencoder(SaeShape(d_in=D + 1, width=4, arch="relu", hook="resid"))
    with pytest.raises(LmscopeError, match="has width 8 in the store but the SAE reads 9"):
        feature_report(other, setup["store"])


def test_feature_cards_show_alive_features_with_their_provenance(setup: dict) -> None:
    from lmscope.report.feature_cards import feature_cards, pick_features
    from lmscope.report.html import Cards, Section, render_html

    report = feature_report(setup["sae"], setup["store"], top_n=3, replay=MiniSuiteSource(setup["suite"].root))
    stats = report.stats.to_pylist()
    alive = sorted((s for s in stats if s["fired"]), key=lambda s: (-s["density"], s["feature"]))
    picked = pick_features(report.stats, 3)
    assert picked[0] == alive[0]["feature"] and picked[-1] == alive[-1]["feature"] and len(set(picked)) == 3
    cards = feature_cards(report.stats, report.examples, picked, max_examples=2)
    assert [c.title for c in cards] == [f"feature {f}" for f in picked]
    for card in cards:
        assert 1 <= len(card.examples) <= 3 and card.examples[0].source.startswith("top: ")
    sources = [e.source for c in cards for e in c.examples]
    assert all(("trained at" in s) != ("never trained on" in s) for s in sources if "token -1" not in s)
    page = render_html("t", "s", [Section("features", [], [Cards("SAE features", cards)])])
    assert page.count("<div class='card'>") == 3 and page.count("<mark>") == sum(len(c.examples) for c in cards)
