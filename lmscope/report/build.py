"""The study report: ``runs/<name>/report.html``, one self-contained page a newcomer can read.

It says what was studied and on what (model, corpus, suite), shows every figure the study's
results support with a one-line reading computed from the same numbers, lists the
activations captured, and ends with how to reproduce and query the run. Figures are also
kept as PNG files in ``runs/<name>/figures/``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import lmscope
from lmscope.report.figures import sweep_figures
from lmscope.report.html import Section, Table, write_html


def _read_eval_results(run_dir: Path) -> pa.Table | None:
    """The sweep's rows at known checkpoints (the suite's own learning check, on other documents, is left out)."""
    path = run_dir / "results" / "eval.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path)
    return table.filter(pc.is_valid(table["step"]))


def _suite_section(suite: dict[str, Any], meta: dict[str, Any]) -> Section:
    sizes = meta.get("sizes", {})
    data = meta.get("data", {})
    tokens = (suite.get("steps") or 0) * (suite.get("tokens_per_step") or 0)
    rows = []
    for model in suite["models"]:
        info = sizes.get(model["model"], {})
        rows.append({"model": model["model"], "parameters": model.get("params"), "layers": info.get("num_layers"),
                     "hidden size": info.get("hidden_size"), "heads": info.get("heads"), "peak lr": info.get("lr"),
                     "held-out bits/byte at the end": model.get("heldout_bits_per_byte")})
    if suite.get("unigram_bits_per_byte") is not None:
        rows.append({"model": "unigram baseline", "parameters": None, "layers": None, "hidden size": None, "heads": None,
                     "peak lr": None, "held-out bits/byte at the end": suite["unigram_bits_per_byte"]})
    paragraphs = [
        f"A suite of {len(suite['models'])} GPT-NeoX models (Pythia's architecture) trained from scratch by lmscope on the "
        f"corpus's training split, all on the same data in the same order: {suite['steps']} steps of "
        f"{suite['tokens_per_step']:,} tokens ({tokens:,} tokens per model"
        + (f", {data['fraction_of_epoch']:.0%} of one epoch" if data.get("fraction_of_epoch") else "")
        + f"), with {suite['checkpoints']} checkpoints kept. Because the data order is recorded, every training "
        "sequence's step is known; the memorization figure uses it.",
        f"Step 0 trained on {suite['step0_rows']} rows drawn from {suite['step0_documents']} documents; tokens by domain: "
        + ", ".join(f"{d} {n:,}" for d, n in suite["step0_domains"].items()) + ".",
    ]
    return Section("The suite", paragraphs, [Table("Sizes, and bits per byte on held-out text after the last step", rows)])


def _sae_section(run_dir: Path, sae: dict[str, Any]) -> Section:
    """What the study's SAE is, how well it reconstructs, and cards of some of its features."""
    from lmscope.report.feature_cards import feature_cards, pick_features
    from lmscope.report.html import Cards

    cfg, rec, spl = sae["config"], sae["reconstruction"], sae["spliced"]
    paragraphs = [
        f"A {cfg['arch']} sparse autoencoder with {cfg['width']:,} latents"
        + (f" (k = {cfg['k']})" if cfg.get("k") else "")
        + f" was trained on {cfg['tokens']:,} activations of {sae['model'].rsplit('/', 1)[-1]} at {cfg['hook']}, taken from the "
        "suite's own training text, so every example below carries the training steps at which that exact token was seen. "
        "It is saved in SAELens's format (sae/cfg.json, sae/sae_weights.safetensors) and loads there unchanged.",
        f"It leaves {rec['fvu']:.1%} of the variance unexplained with {rec['l0']:.1f} active latents per token; "
        f"{rec['dead_features']:,} latents never fired. Spliced into the model on held-out text it raises the loss from "
        f"{spl['ce_clean']:.3f} to {spl['ce_spliced']:.3f} nats (zero-ablating the hook gives {spl['ce_zero']:.3f}): "
        + (f"{spl['ce_recovered_zero']:.1%} of the loss recovered." if spl.get("ce_recovered_zero") is not None else "."),
    ]
    metrics = [{"quantity": k, "value": v} for k, v in
               [("fraction of variance unexplained", rec["fvu"]), ("L0 (active latents per token)", rec["l0"]),
                ("dead latents", rec["dead_features"]), ("dense latents (fire on > 10 % of tokens)", rec["dense_features"]),
                ("CE clean (nats)", spl["ce_clean"]), ("CE with the SAE spliced in", spl["ce_spliced"]),
                ("CE with the hook zero-ablated", spl["ce_zero"]), ("CE with the hook mean-ablated", spl["ce_mean"]),
                ("loss recovered vs zero ablation", spl.get("ce_recovered_zero")),
                ("loss recovered vs mean ablation", spl.get("ce_recovered_mean")), ("KL to the clean model (nats)", spl["kl"])]]
    items: list[Any] = [Table("Reconstruction (training activations) and splicing (held-out text)", metrics)]
    features_dir = Path(sae["features"])
    if not features_dir.is_absolute():
        features_dir = run_dir / features_dir
    stats_path = features_dir / "feature_stats.parquet"
    if stats_path.is_file() and cfg.get("cards"):
        stats = pq.read_table(stats_path)
        examples = pq.read_table(features_dir / "feature_examples.parquet")
        chosen = pick_features(stats, cfg["cards"])
        items.append(Cards(
            f"{len(chosen)} features, from the most to the least frequent (bars: histogram of log10 activation; marked: the "
            "token where the feature fires; then its domain, document, position and the training steps that held it)",
            feature_cards(stats, examples, chosen)))
    return Section("Sparse autoencoder features", paragraphs, items)


def _track_section(run_dir: Path, track: dict[str, Any]) -> Section:
    """Features followed across checkpoints: counts, lineage densities and lineage cards."""
    from lmscope.report.feature_cards import lineage_cards
    from lmscope.report.figures import track_figures
    from lmscope.report.html import Cards
    from lmscope.sae.track import pick_lineages, read_track

    track_dir = run_dir / track["out"]
    timeline, _, record = read_track(track_dir)
    steps = ", ".join(map(str, record["steps"]))
    paragraphs = [
        f"The same SAE was trained at checkpoints {steps} of {track['size']} ({track['hook']}), on the same "
        f"{record['tokens']:,} tokens of training text each time, each SAE starting from the previous checkpoint's (latents "
        "that were dead start afresh). Latents of consecutive checkpoints are matched one to one by decoder cosine "
        f"(≥ {record['threshold']}); a chain of matches is a lineage. {record['lineages']:,} lineages in all, in "
        f"{track['out']}/timeline.parquet; the counts per checkpoint are rows of results/sae_track.parquet.",
    ]
    items: list[Any] = list(track_figures(track_dir, run_dir / "figures"))
    if track.get("cards"):
        chosen = pick_lineages(timeline, track["cards"])
        items.append(Cards(
            f"{len(chosen)} of the longest-lived lineages: the latent each one is at every checkpoint, how often it fires "
            "there, and its top contexts (marked: the token; then the domain, document, position and training steps)",
            lineage_cards(track_dir, timeline, chosen)))
    return Section("Features across training", paragraphs, items)


def _trace_section(run_dir: Path, trace: dict[str, Any]) -> Section:
    """Each traced generation: the output with its corpus spans marked, and the documents behind them with exposure steps."""
    from lmscope.report.html import Cards, Example, FeatureCard, Passage

    step = trace["step"]
    paragraphs = [
        f"The {trace['identity']['size']} model at step {step} continued each prompt greedily, and the continuation was "
        "traced into the suite's corpus as OLMoTrace does: at every position the longest span found verbatim in the "
        "corpus (a suffix-array index, traces/index), maximal spans of at least "
        f"{trace.get('min_length', 5)} tokens occurring at most {trace.get('max_frequency', 10)} times kept, the longest "
        "5 % of the output's length shown, and up to 10 documents per span ranked by BM25 against prompt and output. "
        f"Because the data order is known, each match says whether a batch before step {step} held it (so the model "
        "could have learned it there) and at which step. traces/trace-N.html shows each trace on its own.",
    ]
    items: list[Any] = []
    for number, entry in enumerate(trace["traces"]):
        data = json.loads((run_dir / trace["out"] / entry["json"]).read_text())
        pieces = [(segment.get("text", ""), bool(segment["spans"])) for segment in data["segments"]]
        items.append(Passage(
            f"{number + 1}. {data.get('prompt')!r} →",
            pieces,
            f"{len(data['spans'])} span(s) kept of {data['n_maximal_spans']} maximal; {len(data['documents'])} documents, "
            f"{entry['seen_documents']} of them holding a match that a batch before step {step} held."))
        cards = []
        for document in data["documents"][:6]:
            examples = []
            for match in document["matches"][:2]:
                parts = match["window"].get("parts") or {}
                seen = match.get("exposures") or {}
                if seen.get("steps"):
                    when = f"trained at step {', '.join(map(str, seen['steps'][:3]))}" + (" …" if len(seen["steps"]) > 3 else "")
                    when += "" if seen.get("seen_before") else f" (after step {step})"
                elif seen.get("partial_steps"):
                    when = f"split across two rows at step {seen['partial_steps'][0]}"
                elif document.get("split") == "train":
                    when = "in no training batch (the suite trains on part of its corpus)"
                else:
                    when = "held out: never trained on"
                examples.append(Example([parts.get("before", ""), parts.get("match", ""), parts.get("after", "")], 1,
                                        float(match["length"]), f"token {match['offset']} of the document · {when}"))
            cards.append(FeatureCard(
                title=f"#{document['rank']} {document['doc_id']}",
                facts=(f"{document['domain']} · {document['split']} split · BM25 {document['bm25']:.3g}"
                       + (f" · first trained at step {document['first_step']}" if document.get("first_step") is not None else "")),
                histogram=[], top_tokens=[], bottom_tokens=[], examples=examples))
        if cards:
            items.append(Cards("Documents behind the marked spans, most relevant first (number before the source: the "
                               "span's length in tokens)", cards))
    return Section("Tracing generations into the training data", paragraphs, items)


def _short_text(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _influence_section(run_dir: Path, influence: dict[str, Any], trace: dict[str, Any] | None) -> Section:
    """Per query: the rows that most raised the completion's probability, their steps, documents and token shares."""
    import pyarrow.parquet as pq

    from lmscope.report.html import Figure, ScoredText
    from lmscope.report.plots import plot_influence_by_exposure

    out = run_dir / influence["out"]
    across = json.loads((out / "across.json").read_text())
    steps = across["steps"]
    last = steps[-1]
    final = json.loads((out / f"step{last}.json").read_text())
    paragraphs = [
        f"Influence functions (Grosse et al. 2023, with {influence['strategy'].upper()} curvature as kronfluence computes it) "
        f"ask which training rows, upweighted, would most raise the log-probability of a completion. The {influence['size']} "
        f"model was analysed at checkpoints {', '.join(f'step{s}' for s in steps)}; each checkpoint's factors were fitted on "
        f"{influence['fit_rows']} rows it had been trained on. Candidates: the {influence['candidates_top']} training rows "
        "closest to each query by BM25 (the paper used TF-IDF), the same rows at every checkpoint. Because the data order is "
        "known, every row comes with the step it was trained at, so each score says whether the checkpoint had seen it.",
        "Queries: " + ("the traced generations above (prompt → the first tokens the model generated), so exact-match tracing "
                       "and influence answer the same question in two ways." if influence.get("queries_from") == "trace"
                       else "those of the study's [influence] table."),
    ]
    items: list[Any] = []
    trace_docs: list[set[str]] = []
    if trace and influence.get("queries_from") == "trace":
        for entry in trace["traces"]:
            data = json.loads((run_dir / trace["out"] / entry["json"]).read_text())
            trace_docs.append({d["doc_id"] for d in data["documents"]})
    scores = pq.read_table(out / "scores.parquet")
    titles = [_short_text(f"{q['prompt']!r} → {q['completion']!r}", 48) for q in across["queries"]]
    png = plot_influence_by_exposure(scores, last, titles, run_dir / "figures" / "influence_by_exposure.png")
    for q, query in enumerate(across["queries"]):
        logprobs = ", ".join(f"{k} {v:.2f}" for k, v in query["completion_logprob"].items())
        rows = []
        for rank, row in enumerate(query["top"], start=1):
            entry = {"rank": rank, "summed score": row["total"]}
            entry.update({f"at {k}": v for k, v in row["scores"].items()})
            entry["trained at step"] = row["step"]
            entry["seen by"] = ", ".join(row["seen_by"]) or "none of these checkpoints"
            entry["documents"] = "; ".join(f"{d['doc_id']} ({d['domain']})" for d in row["documents"])
            rows.append(entry)
        overlap = ""
        if q < len(trace_docs):
            docs = {d["doc_id"] for row in query["top"] for d in row["documents"]}
            shared = docs & trace_docs[q]
            overlap = (f" {len(shared)} of the {len(docs)} documents in these rows also hold an exact match of the generation "
                       f"(tracing above).")
        items.append(Table(f"{q + 1}. {_short_text(query['prompt'], 40)!r} → {_short_text(query['completion'], 80)!r}: "
                           f"the most influential rows, summed over checkpoints (log p of the completion: {logprobs}).{overlap}", rows, 3))
        for row in final["queries"][q]["proponents"][:2]:
            docs = "; ".join(f"{d['doc_id']} ({d['domain']}, {d['score']:.3g})" for d in row["documents"] if d.get("doc_id"))
            items.append(ScoredText(
                f"Row {row['position']} (trained at step {row['step']}), influence {row['score']:.3g} at step{last}",
                row["tokens"], row["token_scores"],
                f"Each token shaded by its share of the row's influence (green raises the completion, red lowers it). "
                f"Documents, with their shares: {docs}."))
    items.append(Figure(
        "Influence against the step each row was trained at", png,
        f"At step{last}, {sum(1 for r in scores.to_pylist() if r['checkpoint_step'] == last and r['score'] > 0)} of "
        f"{sum(1 for r in scores.to_pylist() if r['checkpoint_step'] == last)} candidate scores are positive.",
        f"Each dot is one candidate row: x, the training step at which it was used; y, its influence on the completion at "
        f"step{last} (positive: upweighting it raises the completion's probability). Hollow: rows trained after the checkpoint."))
    return Section("Which training rows made the model say this (influence functions)", paragraphs, items)


def _record_source(record: dict[str, Any]) -> str:
    from lmscope.report.feature_cards import _source

    return f"{record['record_kind']}: " + _source(record)


def _explain_section(run_dir: Path, explain: dict[str, Any]) -> Section:
    """Explanations of features and neurons: score distributions against the shuffled baseline, cards, a lineage over time."""
    import pyarrow.parquet as pq

    from lmscope.report.html import ActivationLine, ExplanationCard, ExplanationCards, Figure
    from lmscope.report.plots import plot_explanation_scores
    from lmscope.report.readings import explanation_scores

    out = run_dir / explain["out"]
    explainer = explain["explainer"]
    runs = explain.get("runs", {})
    what = " and ".join(f"{len(r['units'])} {r['kind']}s of {r['hook']}" for r in runs.values())
    paragraphs = [
        f"A language model ({explainer.get('model')}, {explainer.get('backend')}) read the top-activating records of {what} of "
        f"{explain['model']} (tokens where the unit is active marked, with their activation on a 0–10 scale, as in OpenAI's "
        "\"Language models can explain neurons\") and wrote one short explanation per unit. Each explanation was then scored "
        "on held-out records it never saw: simulation (the model, given only the explanation, predicts each token's "
        "activation; the score is the correlation of its expected value with the truth), detection (does the unit fire "
        "anywhere in this text: balanced accuracy over activating and quiet texts) and fuzzing (are the marked tokens the "
        "active ones: balanced accuracy over right and random marks), the last two as in EleutherAI's delphi.",
        "Every unit is also scored with another unit's explanation (shuffled): that is chance for this explainer and these "
        "records, and an explanation is worth what it scores above it. Scores are rows of results/explain.parquet "
        "(metrics explain_*, column explanation_source own or shuffled).",
    ]
    items: list[Any] = []
    results_path = run_dir / "results" / "explain.parquet"
    if results_path.is_file():
        results = pq.read_table(results_path)
        png = plot_explanation_scores(results, run_dir / "figures" / "explanation_scores.png")
        items.append(Figure("Explanation scores: SAE features against neurons, own explanations against shuffled ones", png,
                            explanation_scores(results),
                            "Each dot is one unit; the bar is the median; the dotted line is chance. Pale dots: the same units "
                            "scored with another unit's explanation."))
    cards = []
    for run in runs.values():
        directory = out / ("features" if run["kind"] == "feature" else "neurons")
        table = pq.read_table(directory / "explanations.parquet").to_pylist()
        records = pq.read_table(directory / "records.parquet").to_pylist()
        for row in table:
            mine = [r for r in records if r["unit"] == row["unit"]]
            shown = [r for r in mine if r["group"] == "explain"][:2] + [r for r in mine if r["group"] == "holdout"][:2]
            lines = []
            for r in shown:
                top = max(row["max_activation"], 1e-30)
                levels = [min(10.0, max(0.0, 10 * a / top)) for a in r["activations"]]
                lines.append(ActivationLine(r["tokens"], levels, r["predicted"],
                                            ("shown to the explainer · " if r["group"] == "explain" else "held out · ")
                                            + _record_source(r)))
            facts = (f"simulation {row['simulation']:.2f} (shuffled {row.get('baseline_simulation', float('nan')):.2f}) · "
                     f"detection {row['detection']:.2f} ({row.get('baseline_detection', float('nan')):.2f}) · fuzzing "
                     f"{row['fuzzing']:.2f} ({row.get('baseline_fuzzing', float('nan')):.2f}) · fires on {row['density']:.2%} of tokens")
            cards.append(ExplanationCard(f"{row['kind']} {row['unit']} of {row['hook']}", row["explanation"], facts, lines))
    if cards and explain.get("cards"):
        per_kind = max(1, explain["cards"] // max(len(runs), 1))
        chosen = [c for kind in ("feature", "neuron") for c in [c for c in cards if c.title.startswith(kind)][:per_kind]]
        items.append(ExplanationCards(
            "Explained units (orange: the true activation, 0–10; blue: what the simulator predicted from the explanation alone; "
            "each record with its domain, document, position and the training steps that held its strongest token)", chosen))
    track = explain.get("track")
    if track:
        items.append(Table(f"Lineage {track['lineage']} of the feature track, explained at each checkpoint where it is alive",
                           [{"step": h["step"], "latent": h["latent"], "fires on": f"{h['density']:.2%}",
                             "explanation": h["explanation"], "simulation": h["simulation"]} for h in track["history"]], 3))
    return Section("What the units do, in words (automated explanations)", paragraphs, items)


def build_report(run_dir: str | os.PathLike[str], summary: dict[str, Any] | None = None,
                 command: str = "lmscope study") -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/figures/*.png``) from the run's summary and results; returns its path."""
    run_dir = Path(run_dir)
    summary = summary if summary is not None else json.loads((run_dir / "summary.json").read_text())
    eval_rows = _read_eval_results(run_dir)
    corpus = summary["corpus"]
    sections: list[Section] = []

    intro = [
        f"This report was written by lmscope {lmscope.__version__} for the study {summary['study']!r}. It measures how "
        "language models change while they train, using everything a fully open suite publishes: the weights at every "
        "checkpoint, the training data, and the order in which it was seen.",
        f"Corpus: {corpus['documents']:,} documents, {corpus['tokens']:,} tokens (for the pretrained model's tokenizer), "
        f"in {len(corpus['domains'])} domains: {', '.join(corpus['domains'])}. A fixed part of each domain, chosen by a hash "
        "of the document id, is held out and never trained on; every evaluation below uses held-out text unless it "
        "says otherwise.",
    ]
    sections.append(Section("What was studied", intro))

    suite = summary.get("suite")
    if suite:
        meta_path = Path(suite["path"]) / "suite.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        sections.append(_suite_section(suite, meta))

    figures = sweep_figures(eval_rows, run_dir / "figures") if eval_rows is not None and eval_rows.num_rows else []
    evaluation = summary.get("evaluation") or {}
    if figures:
        paragraphs = []
        if evaluation:
            paragraphs.append(
                f"Checkpoints {', '.join(str(s) for s in evaluation.get('steps', []))} of every size were evaluated on "
                f"{', '.join(evaluation.get('metrics', []))}; {evaluation.get('rows', 0):,} numbers in all, in "
                "results/eval.parquet.")
        sections.append(Section("Across training and scale", paragraphs, list(figures)))
    elif suite:
        sections.append(Section("Across training and scale", ["No evaluation results: the study's [eval] metrics list is empty."]))

    sae = summary.get("sae")
    if sae:
        sections.append(_sae_section(run_dir, sae))
    track = summary.get("sae_track")
    if track:
        sections.append(_track_section(run_dir, track))
    trace = summary.get("trace")
    if trace:
        sections.append(_trace_section(run_dir, trace))
    influence = summary.get("influence")
    if influence:
        sections.append(_influence_section(run_dir, influence, trace))
    explain = summary.get("explain")
    if explain:
        sections.append(_explain_section(run_dir, explain))

    activations = summary.get("activations") or []
    if activations:
        by_domain = ", ".join(f"{d} {n:,}" for d, n in summary.get("activation_rows_by_domain", {}).items())
        sections.append(Section(
            "Activations of the pretrained model",
            [f"Model {summary['model']!r} ({summary['model_type']}, {summary['n_layers']} layers) was run on held-out contexts "
             f"and the residual stream at the hooks below was stored in activations/ (safetensors shards with per-token "
             f"document provenance), ready for sparse autoencoders. Token positions by domain: {by_domain}."],
            [Table("Activations captured (mean and std over all entries; norm per token)", activations)],
        ))

    timings = summary.get("timings", {})
    sections.append(Section("Reproduce and query", [
        f"Command: {command}. Rerunning it reuses everything already computed (corpus, suite, activations, each "
        "checkpoint's metrics) and redraws this report.",
        "Every number is a row of one long table (suite, model, size, seed, revision, step, tokens_seen, metric, domain, "
        "value, plus extra columns such as layer and head) in results/*.parquet; query it with SQL, e.g. "
        "lmscope results query \"SELECT model, step, value FROM results WHERE metric = 'bits_per_byte' AND domain = 'all' "
        "ORDER BY model, step\" --path runs/" + summary["study"] + "/results.",
        "manifest.json lists every file of the run with its sha256, the library versions and the resolved config. "
        "Timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()) + ".",
    ]))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return write_html(run_dir / "report.html", f"lmscope study: {summary['study']}",
                      f"{stamp} · lmscope {lmscope.__version__} · run directory {run_dir.name}", sections)
