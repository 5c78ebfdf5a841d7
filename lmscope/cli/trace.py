"""``lmscope trace``: trace a text, or a model's greedy answer to a prompt, into the training corpus (OLMoTrace's method)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmscope.cli import app
from lmscope.cli.options import DeviceOption, DtypeOption, JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.errors import LmscopeError

# TraceSettings' defaults, repeated so that the command line starts without importing the index (a test keeps them equal)
_MIN_LENGTH, _MAX_FREQUENCY, _TOP_FRACTION, _RANK_BY, _DOCS_PER_SPAN, _WINDOW, _SEED = 5, 10, 0.05, "length", 10, 32, 0


def _clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", " ")


@app.command("trace")
def trace_command(
    index_dir: Annotated[Path, typer.Option("--index", help="The index directory (built by `lmscope index build`).")],
    text: Annotated[str | None, typer.Option("--text", help="The output to trace, as text (encoded with the corpus's tokenizer).")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="The output to trace, as token ids, comma-separated.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Generate the output greedily with this model spec (its tokenizer must be the corpus's); needs --prompt.")
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="The prompt: continued by --model, or joined to the BM25 query of --text.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="With --model: tokens to generate at most (stops at end-of-text).")] = 64,
    min_length: Annotated[int, typer.Option("--min-length", help="Shortest span kept, in tokens.")] = _MIN_LENGTH,
    max_frequency: Annotated[
        int, typer.Option("--max-frequency", help="Drop spans occurring more often than this in the corpus (0: no limit).")
    ] = _MAX_FREQUENCY,
    top_fraction: Annotated[float, typer.Option("--top-fraction", help="Keep the ⌈F·L⌉ best spans of an L-token output.")] = _TOP_FRACTION,
    rank_by: Annotated[str, typer.Option("--rank-by", help="Best spans: 'length' (longest) or 'unigram' (lowest unigram log-probability).")] = _RANK_BY,
    docs_per_span: Annotated[int, typer.Option("--docs-per-span", help="Occurrences sampled per span.")] = _DOCS_PER_SPAN,
    window: Annotated[int, typer.Option("--window", help="Tokens of context on each side of an occurrence (also the BM25 text).")] = _WINDOW,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the occurrence sample.")] = _SEED,
    suite: Annotated[Path | None, typer.Option("--suite", help="A mini suite trained on the corpus: add the training steps of every occurrence.")] = None,
    before_step: Annotated[int | None, typer.Option("--before-step", help="With --suite: count the exposures checkpoint stepN had seen (steps < N).")] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Tokenizer for text (default: the one the corpus names; a suite's own for --suite).")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the trace as a self-contained HTML page here.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
) -> None:
    """Trace an output into the corpus: its longest rare exact matches (spans), the documents holding them ranked by BM25, and, with --suite, the training steps that saw them."""
    from lmscope.index.exposures import open_suite
    from lmscope.index.trace import TraceSettings, trace_model, trace_text, trace_tokens
    from lmscope.index.trace_html import write_trace_html

    given = [name for name, value in (("--text", text), ("--tokens", tokens), ("--model", model)) if value is not None]
    if len(given) != 1:
        raise LmscopeError("give the output with exactly one of --text TEXT, --tokens IDS, or --model SPEC with --prompt P.")
    if model is not None and prompt is None:
        raise LmscopeError("--model continues a prompt; give it with --prompt TEXT.")
    if tokens is not None and prompt is not None:
        raise LmscopeError("--prompt is text, but the output was given as --tokens; give the output with --text instead.")
    source = open_suite(suite) if suite is not None else None
    from lmscope.cli.index import _open, _parse_ids

    index = _open(index_dir, tokenizer, source)
    options = dict(
        min_length=min_length,
        max_frequency=max_frequency or None,
        top_fraction=top_fraction,
        rank_by=rank_by,
        docs_per_span=docs_per_span,
        window=window,
        seed=seed,
        suite=source,
        before_step=before_step,
    )
    TraceSettings(min_length, max_frequency or None, top_fraction, rank_by, docs_per_span, window, seed)  # refuse bad settings before loading a model
    if before_step is not None and source is None:
        raise LmscopeError("--before-step counts exposures in a suite's training; name the suite with --suite.")
    with progress_bars(enabled=not json_output) as progress:
        if model is not None:
            trace = trace_model(index, model, prompt or "", max_new_tokens=max_new_tokens, device=device, dtype=dtype, progress=progress, **options)
        elif text is not None:
            trace = trace_text(index, text, prompt=prompt, progress=progress, **options)
        else:
            trace = trace_tokens(index, _parse_ids(tokens or "", "--tokens"), decode=tokenizer is not None, progress=progress, **options)
    written = write_trace_html(trace, html) if html is not None else None
    if json_output:
        out = trace.to_dict()
        if written is not None:
            out["html"] = str(written)
        print_json(out)
        return
    decoded = trace.text is not None
    if trace.model is not None:
        stdout.print(f"[bold]{trace.model['spec']}[/] after {trace.prompt!r}: {trace.text!r}", highlight=False)
    stdout.print(
        f"{len(trace.tokens)} tokens: {trace.n_maximal} maximal spans, {trace.n_candidates} of ≥ {trace.settings.min_length} tokens "
        f"occurring ≤ {trace.settings.max_frequency if trace.settings.max_frequency is not None else '∞'} times; {len(trace.spans)} kept; "
        f"{len(trace.documents)} documents.",
        highlight=False,
    )
    if not trace.spans:
        stdout.print("No span passed the filters; lower --min-length, or raise --max-frequency (0: no limit).", highlight=False)
        if written is not None:
            stdout.print(f"HTML view: {written}", highlight=False)
        return
    rows = [
        {
            "span": k,
            "tokens": f"{s.start}–{s.stop}",
            "text": _clean(s.text) if decoded and s.text is not None else ",".join(map(str, s.tokens)),
            "count": s.count,
            "unigram logprob": round(s.unigram_logprob, 2),
        }
        for k, s in enumerate(trace.spans, start=1)
    ]
    print_table(rows, title="spans")
    docs = []
    for d in trace.documents:
        row = {"rank": d.rank, "bm25": round(d.score, 3), "document": d.doc_id, "domain": d.domain, "split": d.split, "spans": ", ".join(str(s + 1) for s in d.spans)}
        if source is not None:
            row["first step"] = "never" if d.first_step is None else d.first_step
            if before_step is not None:
                row[f"seen before step{before_step}"] = sum((m.exposures or {}).get("seen_before") or 0 for m in d.matches)
        docs.append(row)
    print_table(docs, title="documents (by BM25)")
    if written is not None:
        stdout.print(f"HTML view: {written}", highlight=False)
