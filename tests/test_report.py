"""Report layer: readings against brute-force figures from the same rows, plots as real PNGs, a page that loads nothing."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from lmscope.errors import LmscopeError
from lmscope.evals.icl import uniform_induction_score
from lmscope.report import plots, readings
from lmscope.report.figures import sweep_figures
from lmscope.report.html import Figure, Section, Table, render_html, write_html
from lmscope.results.schema import results_table

MODELS = ("1.6m", "0.3m")  # deliberately not in size order
STEPS = (0, 8, 64)
DOMAINS = ("git-docs", "manpages", "python-docs")


def _identity(model: str, step: int) -> dict:
    return {"suite": "t", "model": model, "size": model, "seed": 0, "revision": f"step{step}", "step": step,
            "tokens_seen": step * 100}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for model in MODELS:
        for step in STEPS:
            ident = _identity(model, step)
            for domain in DOMAINS + ("all",):
                out.append({**ident, "metric": "bits_per_byte", "domain": domain, "value": float(rng.uniform(1, 4))})
            out.append({**ident, "metric": "icl_score", "domain": "all", "value": float(rng.normal())})
            for layer in range(2):
                for head in range(2):
                    out.append({**ident, "metric": "induction_score", "domain": "repeated_random_tokens",
                                "value": float(rng.uniform()), "layer": layer, "head": head, "seq_len": 50})
                for lens in ("logit", "tuned"):
                    for metric in ("lens_kl", "lens_cross_entropy"):
                        out.append({**ident, "metric": metric, "domain": "all", "value": float(rng.uniform(0, 3)),
                                    "layer": layer, "lens": lens})
            for seq in range(20):
                seen_at = seq * 4
                score = float(rng.integers(0, 33) / 32) if seq % 5 else 1.0
                out.append({**ident, "metric": "memorization_score", "domain": DOMAINS[seq % 3], "value": score,
                            "step_seen": seen_at, "seen": seen_at < step, "row": seq})
    return out


def test_metric_reading_states_first_last_and_best_from_the_rows(rows: list[dict]) -> None:
    text = readings.metric_vs_tokens(rows, "bits_per_byte", "Bits per byte went")
    finals = {}
    for model in MODELS:
        mine = sorted((r["step"], r["value"]) for r in rows if r["model"] == model and r["metric"] == "bits_per_byte"
                      and r["domain"] == "all")
        assert f"{model} {mine[0][1]:.3g} → {mine[-1][1]:.3g}" in text
        finals[model] = mine[-1][1]
    assert text.index("0.3m") < text.index("1.6m"), "models are listed in size order"
    assert text.endswith(f"{min(finals, key=finals.get)} ends lowest.")
    assert readings.metric_vs_tokens(rows, "no_such_metric", "x") is None


def test_domain_reading_names_the_easiest_and_hardest_domain(rows: list[dict]) -> None:
    last = {r["domain"]: r["value"] for r in rows if r["model"] == "1.6m" and r["step"] == 64 and r["metric"] == "bits_per_byte"
            and r["domain"] != "all"}
    text = readings.domain_heatmap(rows)
    easy, hard = min(last, key=last.get), max(last, key=last.get)
    assert f"finds {easy} easiest ({last[easy]:.2f} bits/byte) and {hard} hardest ({last[hard]:.2f})" in text


def test_memorization_reading_counts_seen_sequences_and_the_unseen_control(rows: list[dict]) -> None:
    text = readings.memorization(rows)
    final = [r["value"] for r in rows if r["model"] == "1.6m" and r["step"] == 64 and r["metric"] == "memorization_score" and r["seen"]]
    assert f"{np.mean(final):.1%} of the 32 tokens" in text
    assert f"{sum(v == 1.0 for v in final)} of {len(final)} sequences exactly" in text
    # The control: the last checkpoint that has seen some sampled sequences and not others (here step 64: 76 > 64).
    at = [r for r in rows if r["model"] == "1.6m" and r["step"] == 64 and r["metric"] == "memorization_score"]
    seen = np.mean([r["value"] for r in at if r["seen"]])
    unseen = np.mean([r["value"] for r in at if not r["seen"]])
    assert f"at step 64 it scores {seen:.1%} on sequences already trained on against {unseen:.1%}" in text


def test_induction_reading_names_the_top_head_and_chance(rows: list[dict]) -> None:
    final = [r for r in rows if r["metric"] == "induction_score" and r["step"] == 64]
    top = max(final, key=lambda r: r["value"])
    text = readings.induction_heads(rows)
    assert f"layer {top['layer']} head {top['head']} of {top['model']}" in text and f"{top['value']:.1%}" in text
    assert f"about {uniform_induction_score(50):.1%}" in text


def test_lens_reading_uses_logit_and_tuned_values(rows: list[dict]) -> None:
    at = {(r["lens"], r["layer"]): r["value"] for r in rows if r["metric"] == "lens_kl" and r["model"] == "1.6m" and r["step"] == 64}
    text = readings.lens(rows)
    assert f"gives {at[('logit', 0)]:.2f} nats of KL" in text and f"brings it to {at[('tuned', 0)]:.2f}" in text
    assert "cross-entropy" in readings.lens(rows, "lens_cross_entropy")


def test_every_figure_is_a_png_and_each_has_a_reading(rows: list[dict], tmp_path: Path) -> None:
    figures = sweep_figures(results_table(rows), tmp_path)
    assert [Path(f.png).stem for f in figures] == ["overview", "bits_per_byte", "bits_per_byte_by_domain", "icl_score", "memorization",
                                                    "induction_heads", "lens_kl", "lens_cross_entropy"]
    for figure in figures:
        image = matplotlib.image.imread(figure.png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert figure.reading and figure.explain
    # Rows without a metric draw nothing rather than an empty figure.
    only_bpb = [r for r in rows if r["metric"] == "bits_per_byte"]
    assert [Path(f.png).stem for f in sweep_figures(only_bpb, tmp_path / "b")] == ["overview", "bits_per_byte", "bits_per_byte_by_domain"]


@pytest.mark.parametrize("plot", [plots.plot_metrics_overview, plots.plot_domain_heatmap, plots.plot_memorization_vs_exposure, plots.plot_induction_heads,
                                  plots.plot_lens_curves])
def test_plots_refuse_results_without_their_metric(plot, tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="to plot"):
        plot([{"model": "m", "metric": "other", "domain": "all", "value": 1.0, "step": 0, "tokens_seen": 0}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_size_labels_sort_by_the_number_they_name() -> None:
    labels = ["1b", "70m", "0.3m", "custom", "160m", "1.6m", "12k"]
    assert sorted(labels, key=plots._size_key) == ["12k", "0.3m", "1.6m", "70m", "160m", "1b", "custom"]


def test_page_is_self_contained_and_escapes_text(tmp_path: Path) -> None:
    png = plots.plot_metric_vs_tokens([{**_identity("m", s), "metric": "x", "domain": "all", "value": float(s)} for s in STEPS],
                                      "x", tmp_path / "x.png")
    sections = [Section("A <script>alert(1)</script> heading", ["p & q"],
                        [Figure("fig", png, "reading <b>", "explain"), Table("t", [{"a": 1.23456789, "b": None, "c": "<i>"}])])]
    page = write_html(tmp_path / "report.html", "title", "sub", sections).read_text()
    assert page == render_html("title", "sub", sections)
    assert "<script>" not in page and "&lt;script&gt;" in page and "p &amp; q" in page and "&lt;i&gt;" in page
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page), "the page must load nothing by URL"
    assert "http://" not in page and "https://" not in page
    (payload,) = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert base64.b64decode(payload) == Path(png).read_bytes()
    assert "1.235" in page


def test_feature_cards_escape_and_mark_the_example_token() -> None:
    from lmscope.report.html import Cards, Example, FeatureCard

    card = FeatureCard("feature 7", "density 1.2%", [0, 3, 6], ["<def>"], [], [Example(["a", "<b>", "c"], 1, 2.5, "doc x · step 3")])
    page = render_html("t", "s", [Section("features", [], [Cards("cards", [card])])])
    assert "<mark>&lt;b&gt;</mark>" in page and "&lt;def&gt;" in page and "<def>" not in page
    assert page.count("<span style='height:") == 3 and "height:36px" in page and "height:0px" in page
