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
