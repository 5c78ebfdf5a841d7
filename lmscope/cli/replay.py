"""``lmscope replay``: the rows trained at a step and their documents, and the steps at which a document was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from lmscope.cli import app
from lmscope.cli.options import JsonOption
from lmscope.cli.render import print_json, print_table, progress_bars, stdout
from lmscope.errors import LmscopeError


class _StepByDefault(TyperGroup):
    """``lmscope replay SUITE --step N`` means ``lmscope replay step SUITE --step N``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["step", *args]
        return super().parse_args(ctx, args)


replay_app = typer.Typer(
    cls=_StepByDefault,
    help=(
        "Data-order replay: the rows trained at a step and their documents (`lmscope replay SUITE --step N`), "
        "and the steps at which a document or token sequence was trained (`lmscope replay find`). Step N is the batch "
        "consumed by the update that turns checkpoint stepN into step(N+1): rows [B·N, B·N+B) of the training order."
    ),
    short_help="Data-order replay: the rows trained at a step, and the steps at which a document was trained.",
    no_args_is_help=True,
)
app.add_typer(replay_app, name="replay")

SUITE_HELP = (
    "A mini-suite directory, a directory holding replay.json (or the file), or pythia, pythia-deduped, olmo, olmo-2, "
    "amber with --data."
)

# the data layout of a published suite (fields of PythiaLayout / OlmoLayout / AmberLayout); they override replay.json
DataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="Pythia: Megatron path prefix (…/document; repeat to concatenate). OLMo: a token file (repeat, in config order). "
        "Amber: the directory of train_NNN.jsonl.",
    ),
]
DataListOption = Annotated[Path | None, typer.Option("--data-list", help="Text file of --data paths, one per line (OLMo's token files).")]
GlobalIndicesOption = Annotated[Path | None, typer.Option("--global-indices", help="OLMo: the epoch's global_indices.npy.")]
BatchSizeOption = Annotated[int | None, typer.Option("--batch-size", help="Rows per step (Pythia 1024; OLMo: global batch in instances, required).")]
SeqLenOption = Annotated[int | None, typer.Option("--seq-len", help="Trained positions per row (default 2048; rows hold seq_len + 1 tokens, OLMo's seq_len).")]
TokenDtypeOption = Annotated[str | None, typer.Option("--dtype", help="OLMo token files' dtype: uint16 (default) or uint32.")]
EosOption = Annotated[str | None, typer.Option("--eos-id", help="Token id that ends documents (cuts rows into segments; Pythia 0), or 'none'.")]
StartStepOption = Annotated[int | None, typer.Option("--start-step", help="OLMo: global step of the first batch in --global-indices (later epochs).")]
RowsPerChunkOption = Annotated[int | None, typer.Option("--rows-per-chunk", help="Amber: lines per chunk (default 1,706,976).")]


def _open_source(
    suite: str,
    data: list[str] | None,
    data_list: Path | None,
    global_indices: Path | None,
    batch_size: int | None,
    seq_len: int | None,
    dtype: str | None,
    eos_id: str | None,
    start_step: int | None,
    rows_per_chunk: int | None,
) -> Any:
    from lmscope.suites.replay import open_source

    paths = list(data or [])
    if data_list is not None:
        try:
            lines = data_list.expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise LmscopeError(f"--data-list {str(data_list)!r} could not be read ({err}); check the path.") from None
        paths += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    eos: int | str | None = None
    if eos_id is not None:
        if eos_id.strip().lower() == "none":
            eos = "none"
        else:
            try:
                eos = int(eos_id)
            except ValueError:
                raise LmscopeError(f"--eos-id {eos_id!r} is not a token id; give an integer, or 'none'.") from None
    return open_source(
        suite,
        data=paths or None,
        global_indices=None if global_indices is None else str(global_indices),
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        eos_token_id=eos,
        start_step=start_step,
        rows_per_chunk=rows_per_chunk,
    )


def _suite_tokenizer(source: Any) -> str | None:
    """A mini suite's tokenizer: its ``tokenizer/`` directory, else the spec its corpus was tokenized with."""
    if source.tokenizer_path is not None:
        return str(source.tokenizer_path)
    return (source.corpus.manifest.get("tokenizer") or {}).get("spec")


def _decoder(tokenizer: str | None, source: Any) -> Any:
    from lmscope.suites.replay import MiniSuiteSource

    if tokenizer is None and isinstance(source, MiniSuiteSource) and source.tokenizer_path is not None:
        tokenizer = str(source.tokenizer_path)  # a suite's own tokenizer decodes its rows without asking
    if tokenizer is None:
        return None
    from lmscope.data.tokenizer_info import load_any_tokenizer

    loaded = load_any_tokenizer(tokenizer)
    return lambda ids: loaded.decode([int(i) for i in ids])


def _preview(tokens: Any, decode: Any, width: int = 60) -> str:
    if decode is not None:
        text = decode(tokens[:48]).replace("\n", "⏎").replace("\t", " ")
        return text if len(text) <= width else text[: width - 1] + "…"
    ids = " ".join(str(int(t)) for t in tokens[:12])
    return ids + (" …" if len(tokens) > 12 else "")


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _pieces(segments: list[Any]) -> str:
    named = [s for s in segments if s.doc_id is not None]
    if named:
        shown = ", ".join(f"{s.doc_id}[{s.doc_offset}:{s.doc_offset + s.length}]" for s in named[:3])
        return shown + (f" +{len(named) - 3}" if len(named) > 3 else "")
    if not segments:
        return "-"
    ends = sum(1 for s in segments if s.ends_document)
    domains = sorted({s.domain for s in segments if s.domain})
    where = f" ({', '.join(domains)})" if domains else ""
    if len(segments) == 1 and not ends:
        return f"one piece{where}"
    return f"{_plural(len(segments), 'piece')}, {_plural(ends, 'document end')}{where}"


@replay_app.command("step")
def step_command(
    suite: Annotated[str, typer.Argument(help=SUITE_HELP)],
    step: Annotated[int, typer.Option("--step", "-s", help="The step N: the batch that turns checkpoint stepN into step(N+1).")],
    rows: Annotated[str | None, typer.Option("--rows", help="Part of the step's batch, A:B (rows A … B-1 of the batch).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Read at most this many rows of the selection (an Amber step is ~1.7M rows).")] = 1024,
    show: Annotated[int, typer.Option("--show", help="Rows to list in the table (all rows go to --json).")] = 8,
    tokens: Annotated[bool, typer.Option("--tokens", help="Include each row's token ids in the --json output.")] = False,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="Decode rows with this tokenizer (model spec or tokenizer directory; a mini suite's own by default).")
    ] = None,
    json_output: JsonOption = False,
    data: DataOption = None,
    data_list: DataListOption = None,
    global_indices: GlobalIndicesOption = None,
    batch_size: BatchSizeOption = None,
    seq_len: SeqLenOption = None,
    dtype: TokenDtypeOption = None,
    eos_id: EosOption = None,
    start_step: StartStepOption = None,
    rows_per_chunk: RowsPerChunkOption = None,
) -> None:
    """The rows trained at step N: positions, first tokens (or text), documents and domains."""
    from lmscope.suites.replay import parse_row_range

    if limit < 1:
        raise LmscopeError(f"--limit {limit} must be at least 1.")
    source = _open_source(suite, data, data_list, global_indices, batch_size, seq_len, dtype, eos_id, start_step, rows_per_chunk)
    selection = parse_row_range(rows) if rows is not None else slice(0, None)
    start = selection.start or 0
    stop = selection.stop if selection.stop is not None else source.rows_in_step(source.check_step(step))
    batch = source.step(step, slice(start, min(stop, start + limit)))
    limited = stop - start > limit
    if json_output:
        out = batch.to_dict(include_tokens=tokens)
        out["suite"] = suite
        out["seen_before_rows"] = len(source.seen_before(step))
        out["limited"] = limited
        print_json(out)
        return
    decode = _decoder(tokenizer, source)
    before, after = source.checkpoints_around(batch.step)
    stdout.print(
        f"[bold]{source.describe()}[/], step {batch.step}: rows {batch.start} … {batch.start + len(batch) - 1} of the batch's "
        f"{batch.rows_in_step:,} (rows of {batch.row_length} tokens): the batch that trains {before} into {after}; "
        f"{before} had seen {_plural(len(source.seen_before(step)), 'row')}.",
        highlight=False,
    )
    table = [
        {
            "position": int(batch.positions[i]),
            "row": int(batch.rows[i]),
            "documents": _pieces(batch.segments[i]),
            "text" if decode is not None else "first tokens": _preview(batch.tokens[i], decode),
        }
        for i in range(min(show, len(batch)))
    ]
    print_table(table, title=f"step {batch.step}")
    if len(batch) > show:
        stdout.print(f"… {_plural(len(batch) - show, 'more row')} (--show N lists more, --json gives all).", highlight=False)
    if limited:
        stdout.print(f"read {len(batch)} of the {stop - start} rows selected (--limit); use --rows A:B for others.", highlight=False)
    documents = batch.documents()
    if documents:
        print_table(
            [{"doc_id": d["doc_id"], "doc_index": d["doc_index"], "domain": d["domain"], "tokens": d["tokens"], "pieces": d["pieces"]} for d in documents[:20]],
            title=f"{len(documents)} documents in these rows" + (" (first 20)" if len(documents) > 20 else ""),
        )
    domains = batch.domains()
    if domains:
        stdout.print("tokens by domain: " + ", ".join(f"{name} {count:,}" for name, count in domains.items()), highlight=False)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", ",").split(",") if part.strip()]
    except ValueError:
        raise LmscopeError(f"--token-ids {text!r} is not a list of integers; write them comma-separated, e.g. 510,275,12.") from None
    if not ids:
        raise LmscopeError("--token-ids is empty; give at least one token id.")
    return ids


def _encode(text: str, tokenizer: str | None, source: Any) -> list[int]:
    from lmscope.data.tokenizer_info import corpus_tokenizer
    from lmscope.suites.replay import MiniSuiteSource

    if tokenizer is None and isinstance(source, MiniSuiteSource):
        tokenizer = _suite_tokenizer(source)
    if tokenizer is None:
        raise LmscopeError("--text needs --tokenizer (a model spec or tokenizer directory) to turn the text into token ids.")
    ids = corpus_tokenizer(tokenizer).encode_batch([text])[0]
    if not ids:
        raise LmscopeError(f"--text {text!r} encodes to no tokens; give some text.")
    return ids


@replay_app.command("find")
def find_command(
    doc_id: Annotated[str | None, typer.Argument(help="Document id in the suite's corpus (mini suites).")] = None,
    suite: Annotated[str | None, typer.Option("--suite", help=SUITE_HELP)] = None,
    doc_index: Annotated[int | None, typer.Option("--doc-index", help="Document index instead of its id (mini suites).")] = None,
    token_range: Annotated[str | None, typer.Option("--tokens", help="Only tokens A:B of the document (positions inside it, B excluded).")] = None,
    token_ids: Annotated[str | None, typer.Option("--token-ids", help="Find an exact token sequence instead, e.g. 510,275,12 (any suite; scans rows).")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Find this text's tokens (needs --tokenizer, except for mini suites). Mid-document text may tokenize differently.")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer for --text: a model spec or tokenizer directory.")] = None,
    steps: Annotated[str | None, typer.Option("--steps", help="Steps to scan for a sequence, A:B (default all; a brute-force scan).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Stop a sequence scan after this many matches.")] = None,
    show: Annotated[int, typer.Option("--show", help="Exposures or matches to list in the table (all go to --json).")] = 20,
    json_output: JsonOption = False,
    data: DataOption = None,
    data_list: DataListOption = None,
    global_indices: GlobalIndicesOption = None,
    batch_size: BatchSizeOption = None,
    seq_len: SeqLenOption = None,
    dtype: TokenDtypeOption = None,
    eos_id: EosOption = None,
    start_step: StartStepOption = None,
    rows_per_chunk: RowsPerChunkOption = None,
) -> None:
    """The steps at which a document (or tokens A:B of it), or an exact token sequence, was trained."""
    from lmscope.suites.replay import find_document, find_tokens, parse_row_range

    if suite is None:
        raise LmscopeError("name the suite to search with --suite (a mini-suite directory, a replay.json directory, or pythia/olmo/amber with --data).")
    by_document = doc_id is not None or doc_index is not None
    by_sequence = token_ids is not None or text is not None
    if by_document == by_sequence or (token_ids is not None and text is not None) or (doc_id is not None and doc_index is not None):
        raise LmscopeError("say what to find with exactly one of: DOC_ID, --doc-index I, --token-ids 1,2,3, --text TEXT.")
    if token_range is not None and not by_document:
        raise LmscopeError("--tokens A:B selects tokens of a document; name the document with DOC_ID or --doc-index.")
    if steps is not None and not by_sequence:
        raise LmscopeError("--steps limits a sequence scan; a document lookup reads the segment index and needs no step range.")
    source = _open_source(suite, data, data_list, global_indices, batch_size, seq_len, dtype, eos_id, start_step, rows_per_chunk)
    if by_document:
        exposures = find_document(source, doc_id, doc_index=doc_index, token_range=parse_row_range(token_range, "--tokens") if token_range else None)
        if json_output:
            print_json(exposures.to_dict())
            return
        start, stop = exposures.token_range
        first = "never trained" if exposures.first_step is None else f"first at step {exposures.first_step}"
        stdout.print(
            f"[bold]document {exposures.doc_id}[/] (index {exposures.doc_index}, domain {exposures.domain}, {exposures.split} split, "
            f"{exposures.n_tokens} tokens): tokens {start}:{stop} trained in {_plural(len(exposures.exposures), 'piece')} at "
        f"{_plural(len(exposures.steps), 'step')}, "
            f"{first}; {exposures.tokens_covered} of {stop - start} tokens covered"
            + (f", all by step {exposures.first_full_step}" if exposures.first_full_step is not None else "")
            + ".",
            highlight=False,
        )
        print_table(
            [{"step": e.step, "position": e.position, "row": e.row, "row tokens": f"{e.row_offset}:{e.row_offset + e.length}", "doc tokens": f"{e.doc_offset}:{e.doc_offset + e.length}"} for e in exposures.exposures[:show]],
            title="exposures",
        )
        if len(exposures.exposures) > show:
            stdout.print(f"… {len(exposures.exposures) - show} more (--show N, or --json).", highlight=False)
        if exposures.untrained_rows:
            stdout.print(f"{exposures.untrained_rows} more pieces lie in rows past the last complete step, never trained.", highlight=False)
        return
    ids = _parse_ids(token_ids) if token_ids is not None else _encode(text, tokenizer, source)  # type: ignore[arg-type]
    scan = None
    if steps is not None:
        chosen = parse_row_range(steps, "--steps")
        scan = range(chosen.start or 0, chosen.stop if chosen.stop is not None else source.num_steps)
    with progress_bars(enabled=not json_output) as progress:
        result = find_tokens(source, ids, scan, limit=limit, progress=progress)
    if json_output:
        print_json(result.to_dict())
        return
    first = "not found" if result.first_step is None else f"first at step {result.first_step}"
    stdout.print(
        f"[bold]token sequence[/] {ids[:12]}{' …' if len(ids) > 12 else ''} ({_plural(len(ids), 'id')}): "
        f"{_plural(len(result.matches), 'match', 'matches')} at {_plural(len(result.match_steps), 'step')}, "
        f"{first}; scanned steps {result.steps.start}:{result.steps.stop} "
        f"({result.rows_scanned:,} rows){' — stopped at --limit' if result.truncated else ''}.",
        highlight=False,
    )
    rows = []
    for match in result.matches[:show]:
        piece = match.to_dict()
        document = f"{piece['doc_id']}@{piece['doc_offset']}" if piece.get("doc_id") is not None else "-"
        rows.append({"step": match.step, "position": match.position, "row": match.row, "row_offset": match.row_offset, "document": document, "origin": match.origin or "-"})
    print_table(rows, title="matches")
    if len(result.matches) > show:
        stdout.print(f"… {len(result.matches) - show} more (--show N, or --json).", highlight=False)
