"""``lmscope index``: build a suffix-array index of a tokenized corpus; count, locate and ∞-gram queries over it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmscope.cli import app
from lmscope.cli.options import JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.errors import LmscopeError

index_app = typer.Typer(
    help=(
        "Exact-match index over a tokenized corpus (a suffix array per shard): counts, locations and ∞-gram next-token "
        "distributions of token sequences, and, with a mini suite, the training steps that saw each match."
    ),
    short_help="Exact-match index over a tokenized corpus: count, locate, ∞-gram.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")

IndexArgument = Annotated[Path, typer.Argument(help="The index directory (built by `lmscope index build`).")]
TokensOption = Annotated[str | None, typer.Option("--tokens", help="The token ids, comma-separated, e.g. 510,275,12.")]
TextOption = Annotated[str | None, typer.Option("--text", help="Text, encoded with the corpus's tokenizer (or --tokenizer).")]
TokenizerOption = Annotated[
    str | None, typer.Option("--tokenizer", help="Tokenizer for text: a model spec or tokenizer directory (default: the one the corpus names).")
]


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LmscopeError(f"{flag} {text!r} is not a list of integers; write them comma-separated, e.g. 510,275,12.") from None
    if not ids:
        raise LmscopeError(f"{flag} is empty; give at least one token id.")
    return ids


def _open(path: Path, tokenizer: str | None, suite: Any = None) -> Any:
    from lmscope.index import Index

    if tokenizer is None and suite is not None and suite.tokenizer_path is not None:
        tokenizer = str(suite.tokenizer_path)
    return Index.open(path, tokenizer=tokenizer)


def _sequence(index: Any, tokens: str | None, text: str | None, what: str = "--tokens or --text") -> list[int]:
    if (tokens is None) == (text is None):
        raise LmscopeError(f"give the sequence with exactly one of {what}.")
    return _parse_ids(tokens, "--tokens") if tokens is not None else index.encode(text)


def _show_ids(ids: list[int], limit: int = 12) -> str:
    return "[" + ", ".join(str(i) for i in ids[:limit]) + (", …" if len(ids) > limit else "") + "]"


def _clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", " ")


@index_app.command("build")
def build_command(
    corpus: Annotated[Path, typer.Argument(help="A tokenized corpus directory, or a mini-suite directory (its corpus/).")],
    out: Annotated[Path, typer.Option("--out", help="The index directory (rerun with the same arguments to resume).")],
    shard_tokens: Annotated[
        int | None, typer.Option("--shard-tokens", help="Corpus tokens per shard at most (default 250,000,000; ~16 bytes of memory per token to build one).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Build the suffix-array index of a tokenized corpus, shard by shard; resumable, atomic."""
    from lmscope.index import DEFAULT_SHARD_TOKENS, build_index

    with progress_bars(enabled=not json_output) as progress:
        report = build_index(corpus, out, shard_tokens=DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens, progress=progress)
    summary = report.to_dict()
    if json_output:
        print_json(summary)
        return
    resumed = f", {summary['shards_resumed']} resumed" if summary["shards_resumed"] else ""
    stdout.print(
        f"[bold]{report.path}[/]: {summary['n_documents']:,} documents, {summary['n_tokens']:,} tokens in {summary['shards']} "
        f"shard{'s' if summary['shards'] != 1 else ''} ({summary['shards_built']} built{resumed}); {summary['bytes'] / 1e6:.1f} MB, "
        f"{summary['bytes_per_token']:.2f} bytes per token; {summary['seconds']:.1f} s.",
        highlight=False,
    )


@index_app.command("info")
def info_command(path: IndexArgument, json_output: JsonOption = False) -> None:
    """Corpus, shards and size of an index."""
    from lmscope.index import Index

    info = Index.open(path).info()
    if json_output:
        print_json(info)
        return
    stdout.print(
        f"[bold]{info['path']}[/]: index of {info['corpus']} — {info['n_documents']:,} documents, {info['n_tokens']:,} tokens "
        f"({info['stream_dtype']}, separator {info['separator']}); {info['bytes'] / 1e6:.1f} MB, {info['bytes_per_token']:.2f} bytes per token.",
        highlight=False,
    )
    print_table(info["shards"], title="shards")


@index_app.command("count")
def count_command(
    path: IndexArgument,
    tokens: TokensOption = None,
    text: TextOption = None,
    tokenizer: TokenizerOption = None,
    json_output: JsonOption = False,
) -> None:
    """How many times a token sequence (or text) occurs in the corpus; never across two documents."""
    index = _open(path, tokenizer)
    ids = _sequence(index, tokens, text)
    count = index.count(ids)
    if json_output:
        print_json({"tokens": ids, "count": count})
        return
    shown = repr(text) if text is not None else _show_ids(ids)
    stdout.print(f"{shown} ({len(ids)} tokens): {count:,} occurrence{'s' if count != 1 else ''} in {index.n_tokens:,} tokens.", highlight=False)


@index_app.command("locate")
def locate_command(
    path: IndexArgument,
    tokens: TokensOption = None,
    text: TextOption = None,
    tokenizer: TokenizerOption = None,
    limit: Annotated[int, typer.Option("--limit", help="Matches to list, in corpus order (the count covers all).")] = 20,
    window: Annotated[int, typer.Option("--window", help="Tokens of context shown on each side of a match.")] = 8,
    suite: Annotated[Path | None, typer.Option("--suite", help="A mini suite trained on this corpus: add the steps at which each match was seen.")] = None,
    before_step: Annotated[int | None, typer.Option("--before-step", help="With --suite: count the exposures checkpoint stepN had seen (steps < N).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Where a token sequence (or text) occurs: document and offset of each match, with a window of context and, for a suite, its training steps."""
    from lmscope.index.exposures import check_same_corpus, open_suite

    if before_step is not None and suite is None:
        raise LmscopeError("--before-step counts exposures in a suite's training; name the suite with --suite.")
    source = open_suite(suite) if suite is not None else None
    index = _open(path, tokenizer, source)
    if source is not None:
        check_same_corpus(index, source)
    ids = _sequence(index, tokens, text)
    found = index.locate(ids, limit=limit)
    decode = text is not None or tokenizer is not None or (source is not None and source.tokenizer_path is not None)
    records = []
    for match in found.matches:
        record = match.to_dict()
        record["window"] = index.window(match, window, window, decode=decode).to_dict()
        if source is not None:
            record.update({k: v for k, v in index.exposures(match, source, before_step=before_step).to_dict().items() if k not in record})
        records.append(record)
    if json_output:
        print_json({"tokens": ids, "count": found.count, "truncated": found.truncated, "matches": records})
        return
    shown = repr(text) if text is not None else _show_ids(ids)
    stdout.print(
        f"{shown} ({len(ids)} tokens): {found.count:,} occurrence{'s' if found.count != 1 else ''}"
        + (f", the first {len(found.matches)} listed (--limit N)." if found.truncated else "."),
        highlight=False,
    )
    rows = []
    for record in records:
        win = record["window"]
        if "parts" in win:
            context = f"{_clean(win['parts']['before'])}[{_clean(win['parts']['match'])}]{_clean(win['parts']['after'])}"
        else:
            a, b = win["match_start"] - win["start"], win["match_stop"] - win["start"]
            ids_ = win["tokens"]
            context = " ".join(map(str, ids_[:a])) + " [" + " ".join(map(str, ids_[a:b])) + "] " + " ".join(map(str, ids_[b:]))
        row = {"document": record["doc_id"], "index": record["doc_index"], "offset": record["offset"], "context": context.strip()}
        if source is not None:
            row["steps"] = ", ".join(map(str, record["steps"][:8])) + (" …" if len(record["steps"]) > 8 else "") or "never"
            row["first"] = "-" if record["first_step"] is None else record["first_step"]
            if before_step is not None:
                row[f"seen before step{before_step}"] = record["seen_before"]
        rows.append(row)
    print_table(rows, title="matches")


@index_app.command("infgram")
def infgram_command(
    path: IndexArgument,
    context: Annotated[str | None, typer.Option("--context", help="The context as text.")] = None,
    context_tokens: Annotated[str | None, typer.Option("--context-tokens", help="The context as token ids, comma-separated.")] = None,
    next_text: Annotated[str | None, typer.Option("--next", help="A next token, as text (must encode to one token): report its probability.")] = None,
    next_token: Annotated[int | None, typer.Option("--next-token", help="A next token id: report its probability.")] = None,
    tokenizer: TokenizerOption = None,
    top: Annotated[int, typer.Option("--top", help="Next tokens to list, most frequent first.")] = 10,
    json_output: JsonOption = False,
) -> None:
    """∞-gram: the next-token distribution after the longest suffix of the context that occurs in the corpus."""
    index = _open(path, tokenizer)
    if context is not None and context_tokens is not None:
        raise LmscopeError("give the context with one of --context TEXT or --context-tokens IDS, not both.")
    if next_text is not None and next_token is not None:
        raise LmscopeError("give the next token with one of --next TEXT or --next-token ID, not both.")
    ids = _parse_ids(context_tokens, "--context-tokens") if context_tokens is not None else (index.encode(context) if context else [])
    if next_text is not None:
        encoded = index.encode(next_text)
        if len(encoded) != 1:
            raise LmscopeError(f"--next {next_text!r} encodes to {len(encoded)} tokens {encoded}; give text of one token, or --next-token ID.")
        next_token = encoded[0]
    result = index.infgram(ids, next_token=next_token)
    decode = context is not None or next_text is not None or tokenizer is not None
    if json_output:
        out = result.to_dict(top=top)
        if decode:
            for item in out["distribution"]:
                item["text"] = index.decode([item["token"]])
        print_json(out)
        return
    suffix = repr(_clean(index.decode(result.suffix))) if decode else _show_ids(result.suffix)
    stdout.print(
        f"longest suffix of the context that occurs: {result.suffix_length} of {len(ids)} tokens {suffix}, "
        f"followed by a token {result.context_count:,} time{'s' if result.context_count != 1 else ''}.",
        highlight=False,
    )
    if result.next_token is not None:
        shown = f"{result.next_token} ({_clean(index.decode([result.next_token]))!r})" if decode else str(result.next_token)
        stdout.print(f"P(next = {shown}) = {result.next_count} / {result.context_count} = {result.probability or 0.0:.4g}", highlight=False)
    rows = [
        {"token": token, **({"text": _clean(index.decode([token]))} if decode else {}), "count": count, "probability": probability}
        for token, count, probability in result.distribution(top)
    ]
    print_table(rows, title=f"next tokens (top {top} of {len(result.counts)})")


# --- corpus statistics ----------------------------------------------------------------------

stats_app = typer.Typer(
    help=(
        "Corpus statistics over an index: a term's frequency in the data seen by each checkpoint of a mini suite, the top n-grams "
        "per domain, exact duplicate documents, and contamination of an evaluation set (n-gram overlap)."
    ),
    short_help="Term frequency by step, top n-grams, duplicates, contamination.",
    no_args_is_help=True,
)
index_app.add_typer(stats_app, name="stats")


def _parse_steps(text: str | None) -> list[int] | None:
    return None if text is None else _parse_ids(text, "--steps")


@stats_app.command("frequency")
def frequency_command(
    path: IndexArgument,
    text: Annotated[list[str] | None, typer.Option("--text", help="A term as text (repeat for several).")] = None,
    tokens: Annotated[list[str] | None, typer.Option("--tokens", help="A term as token ids, comma-separated (repeat for several).")] = None,
    suite: Annotated[Path | None, typer.Option("--suite", help="A mini suite trained on this corpus: count the exposures seen by each checkpoint.")] = None,
    steps: Annotated[
        str | None, typer.Option("--steps", help="With --suite: the checkpoints stepN to report, comma-separated (default: the suite's saved ones).")
    ] = None,
    tokenizer: TokenizerOption = None,
    json_output: JsonOption = False,
) -> None:
    """How often terms occur in the corpus and, with a suite, in the training data seen by each checkpoint (steps < N)."""
    from lmscope.index.exposures import open_suite
    from lmscope.index.stats import term_frequency

    if not text and not tokens:
        raise LmscopeError("give at least one term with --text TEXT or --tokens IDS.")
    source = open_suite(suite) if suite is not None else None
    index = _open(path, tokenizer, source)
    wanted = _parse_steps(steps)
    terms = [(index.encode(t), t) for t in text or []] + [(_parse_ids(t, "--tokens"), None) for t in tokens or []]
    results = [term_frequency(index, ids, suite=source, steps=wanted, text=label) for ids, label in terms]
    if json_output:
        print_json({"terms": [r.to_dict() for r in results]})
        return
    rows = []
    for r in results:
        row = {"term": repr(r.text) if r.text is not None else _show_ids(r.tokens), "in corpus": r.corpus_count, "docs": r.documents}
        if r.suite is not None:
            row["trained"] = r.trained
            row["first"] = "never" if r.first_step is None else r.first_step
            row.update({f"<step{s}": n for s, n in zip(r.checkpoints, r.seen)})
        rows.append(row)
    print_table(rows, title="term frequency" + (" (exposures seen before each checkpoint)" if source is not None else ""))


@stats_app.command("top-ngrams")
def top_ngrams_command(
    path: IndexArgument,
    n: Annotated[int, typer.Option("--n", help="Tokens per n-gram (1–16).")] = 3,
    top: Annotated[int, typer.Option("--top", help="N-grams listed per domain.")] = 10,
    domain: Annotated[list[str] | None, typer.Option("--domain", help="Only this domain (repeat for several; default: all).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Only documents of this split (default: all).")] = None,
    tokenizer: TokenizerOption = None,
    no_text: Annotated[bool, typer.Option("--no-text", help="Show token ids only (no tokenizer needed).")] = False,
    json_output: JsonOption = False,
) -> None:
    """The most frequent n-grams of each domain and of the whole corpus, with exact counts (never across documents)."""
    from lmscope.index.stats import top_ngrams

    index = _open(path, tokenizer)
    with progress_bars(enabled=not json_output) as progress:
        result = top_ngrams(index, n, top=top, domains=domain or None, split=split, decode=not no_text, progress=progress)
    if json_output:
        print_json(result.to_dict())
        return
    for name, grams in result.by_domain.items():
        rows = [
            {"rank": k, "n-gram": repr(g.text) if g.text is not None else _show_ids(g.tokens), "count": g.count, "share": f"{g.count / max(result.totals[name], 1):.3%}"}
            for k, g in enumerate(grams, start=1)
        ]
        print_table(rows, title=f"{name}: {result.totals[name]:,} {n}-grams, {result.distinct[name]:,} distinct")


@stats_app.command("duplicates")
def duplicates_command(
    path: IndexArgument,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="Ignore documents shorter than this.")] = 1,
    limit: Annotated[int, typer.Option("--limit", help="Groups listed (largest waste first).")] = 20,
    json_output: JsonOption = False,
) -> None:
    """Groups of documents with identical tokens, and the tokens they waste."""
    from lmscope.index import Index
    from lmscope.index.stats import duplicate_documents

    index = Index.open(path)
    with progress_bars(enabled=not json_output) as progress:
        result = duplicate_documents(index, min_tokens=min_tokens, progress=progress)
    summary = result.to_dict(limit=limit)
    if json_output:
        print_json(summary)
        return
    stdout.print(
        f"{summary['n_documents']:,} documents of ≥ {min_tokens} tokens: {summary['groups']:,} duplicate groups, {summary['redundant_documents']:,} "
        f"redundant copies ({summary['redundant_tokens']:,} tokens); {summary['groups_across_splits']} groups span two splits.",
        highlight=False,
    )
    rows = [
        {
            "copies": len(g.doc_indices),
            "tokens": g.n_tokens,
            "documents": ", ".join(g.doc_ids[:4]) + (" …" if len(g.doc_ids) > 4 else ""),
            "domains": ", ".join(sorted(set(g.domains))),
            "splits": ", ".join(sorted(set(g.splits))),
        }
        for g in result.groups[:limit]
    ]
    print_table(rows, title="duplicate groups")


@stats_app.command("contamination")
def contamination_command(
    path: IndexArgument,
    eval_set: Annotated[
        Path, typer.Argument(help="The evaluation set: JSONL/Parquet (text field), a .txt file (one document per line), or a tokenized corpus directory.")
    ],
    n: Annotated[int, typer.Option("--n", help="Tokens per n-gram.")] = 13,
    split: Annotated[str | None, typer.Option("--split", help="With a tokenized corpus: only its documents of this split.")] = None,
    against_split: Annotated[
        str | None,
        typer.Option("--against-split", help="Count only matches in corpus documents of this split (default: train, when the set is a split of the index's own corpus)."),
    ] = None,
    text_field: Annotated[str, typer.Option("--field", help="The text field of JSONL/Parquet records.")] = "text",
    limit: Annotated[int, typer.Option("--limit", help="Documents listed (most overlap first).")] = 20,
    tokenizer: TokenizerOption = None,
    json_output: JsonOption = False,
) -> None:
    """Which documents of an evaluation set share an n-gram (13 tokens by default) with the corpus, and how much of each."""
    from lmscope.index.stats import contamination, read_eval_set

    index = _open(path, tokenizer)
    documents = read_eval_set(eval_set, index, split=split, text_field=text_field)
    if against_split is None and any(d.doc_index is not None for d in documents):
        against_split = "train"  # a split of the index's own corpus: contamination means overlap with what was trained on
    with progress_bars(enabled=not json_output) as progress:
        result = contamination(index, documents, n=n, against_split=against_split, progress=progress)
    summary = result.to_dict(limit=limit)
    if json_output:
        print_json(summary)
        return
    against = f" (matches in the {against_split} split only)" if against_split else ""
    stdout.print(
        f"{summary['contaminated']:,} of {summary['n_documents']:,} documents ({summary['fraction']:.1%}) share a {n}-gram with the corpus{against}; "
        f"{summary['ngram_overlap']:.1%} of all their {n}-grams occur in it; {summary['too_short']} documents are shorter than {n} tokens.",
        highlight=False,
    )
    rows = [
        {"document": d["id"], "tokens": d["n_tokens"], f"{n}-grams": d["n_ngrams"], "found": d["matched_ngrams"], "n-gram overlap": f"{d['ngram_overlap']:.1%}", "token overlap": f"{d['token_overlap']:.1%}"}
        for d in summary["documents"]
    ]
    print_table(rows, title="documents (most overlap first)")
