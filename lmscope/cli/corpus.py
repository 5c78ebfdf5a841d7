"""``lmscope corpus``: tokenize documents, build the default offline corpus, and count what a corpus holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lmscope.cli import app
from lmscope.cli.render import print_json, print_table, progress_bars, stderr, stdout

corpus_app = typer.Typer(help="Document corpora: tokenize, build the default offline corpus, statistics.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")

_MB = 1e6


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / _MB:.2f}"


def _print_issues(reader: dict[str, Any]) -> None:
    """Warn on stderr about what the readers skipped or repaired, with the file:line of the first cases."""
    if not reader.get("skipped_malformed") and not reader.get("utf8_replaced"):
        return
    stderr.print(
        f"[yellow]warning:[/] skipped {reader['skipped_malformed']} malformed records; "
        f"replaced invalid UTF-8 in {reader['utf8_replaced']} documents:",
        highlight=False,
    )
    for issue in reader.get("issues", []):
        stderr.print(f"  {issue}", highlight=False, markup=False)
    if reader.get("issues_not_shown"):
        stderr.print(f"  … and {reader['issues_not_shown']} more", highlight=False)


def _print_stats(stats: dict[str, Any]) -> None:
    if stats["kind"] == "tokenized":
        tokenizer = stats.get("tokenizer", {})
        stdout.print(
            f"{stats['path']}: {stats['documents']} documents, {stats['tokens']} tokens ({stats['dtype']}), "
            f"{_megabytes(stats['bytes'])} MB of text; tokenizer {tokenizer.get('spec')} (vocabulary {tokenizer.get('vocab_size')})",
            highlight=False,
        )
        rows = [{key: value for key, value in row.items() if key != "bytes"} | {"MB": _megabytes(row["bytes"])} for row in stats["rows"]]
        print_table(rows, title="per domain and split")
    else:
        stdout.print(f"{stats['path']}: {stats['documents']} documents, {_megabytes(stats['bytes'])} MB of text", highlight=False)
        print_table([{"domain": row["domain"], "documents": row["documents"], "MB": _megabytes(row["bytes"])} for row in stats["rows"]], title="per domain")
    _print_issues(stats.get("reader", {}))


@corpus_app.command("tokenize")
def tokenize(
    inputs: list[Path] = typer.Argument(..., help="Document sources: .jsonl, .jsonl.gz, .jsonl.zst, .parquet files or directories of text files."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer: a model spec (OWNER/NAME, DIR, gguf:FILE, 'default') or a tokenizer directory."),
    out: Path = typer.Option(..., "--out", help="Output directory of the tokenized corpus (rerun with the same arguments to resume)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first malformed record instead of skipping and counting it."),
    heldout_fraction: float = typer.Option(0.05, help="Fraction of each domain held out, by hash of the document id."),
    domain: str | None = typer.Option(None, help="Domain of records that name none (default: the source file's name)."),
    text_field: str = typer.Option("text", help="Name of the text field or column."),
    id_field: str = typer.Option("id", help="Name of the id field or column."),
    batch_docs: int = typer.Option(512, help="Documents per tokenizer call."),
    chunk_docs: int = typer.Option(8192, help="Documents per resumable chunk."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Tokenize documents into a tokenized corpus (tokens.bin + documents.parquet + manifest.json); resumable."""
    from lmscope.data.stats import tokenized_stats
    from lmscope.data.tokenize_job import tokenize_corpus

    with progress_bars(enabled=not as_json) as progress:
        corpus = tokenize_corpus(
            inputs,
            tokenizer,
            out,
            heldout_fraction=heldout_fraction,
            batch_docs=batch_docs,
            chunk_docs=chunk_docs,
            strict=strict,
            domain=domain,
            text_field=text_field,
            id_field=id_field,
            progress=progress,
        )
    stats = tokenized_stats(corpus)
    if as_json:
        print_json({**stats, "run": corpus.manifest.get("run", {})})
        return
    _print_stats(stats)


@corpus_app.command("build-default")
def build_default(
    out: Path | None = typer.Option(None, "--out", help="Output directory (default $LMSCOPE_HOME/corpora/default)."),
    workers: int | None = typer.Option(None, help="Conversion processes (default: the CPUs available)."),
    limit_per_domain: int | None = typer.Option(None, help="Keep only the first N files of each domain (quick checks)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a table."),
) -> None:
    """Assemble the default offline corpus from Debian documentation packages into documents.jsonl.zst."""
    from lmscope.data.default_corpus import build_default_corpus

    with progress_bars(enabled=not as_json) as progress:
        built = build_default_corpus(out, limit_per_domain=limit_per_domain, workers=workers, progress=progress)
    manifest = built.manifest
    if as_json:
        print_json({"path": str(built.path), **manifest})
        return
    rows = [
        {
            "domain": source["domain"],
            "package": f"{source['package']} {source['version'] or ''}".strip(),
            "files": source["files"],
            "documents": source["documents"],
            "MB": _megabytes(source["bytes"]),
            "skipped": ", ".join(f"{count} {why}" for why, count in source["skipped"].items() if count) or "-",
        }
        for source in manifest["sources"]
    ]
    print_table(rows, title=str(built.path))
    stdout.print(
        f"{manifest['total']['documents']} documents, {_megabytes(manifest['total']['bytes'])} MB of text in {manifest['run']['seconds']:.1f} s",
        highlight=False,
    )


@corpus_app.command("stats")
def stats(
    path: Path = typer.Argument(..., help="A tokenized corpus directory, a default-corpus directory, or document files/directories."),
    text_field: str = typer.Option("text", help="Name of the text field or column (raw documents)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Documents, tokens and bytes per domain (and split) of a tokenized corpus or of raw documents."""
    from lmscope.data.stats import corpus_stats

    with progress_bars(enabled=not as_json) as progress:
        result = corpus_stats(path, progress, text_field=text_field)
    if as_json:
        print_json(result)
        return
    _print_stats(result)
