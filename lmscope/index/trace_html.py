"""A trace as one self-contained HTML page: the output with its spans highlighted, and the documents behind each span.

The page loads nothing from anywhere (no scripts, fonts, stylesheets or images by URL). Every
piece of text is HTML-escaped here. Without decoded text (a trace of token ids) tokens are shown
as ids.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError
from lmscope.fsio import atomic_write_text

_STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.02em; margin: 1.2em 0 0.3em 0; }
.subtitle, .facts { color: #555; margin: 0.2em 0 0.5em 0; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-word;
        background: #fafafa; border: 1px solid #e5e5e5; border-radius: 6px; padding: 0.6em 0.8em; }
.text a { color: inherit; text-decoration: none; }
mark.s1 { background: #fff0a8; } mark.s2 { background: #ffd54f; } mark.s3 { background: #ffb300; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-word;
       background: #fafafa; padding: 0.2em 0.4em; margin: 0.2em 0 0.6em 0; border-left: 3px solid #ccc; }
.ctx mark { background: #ffd54f; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f5f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tag { display: inline-block; background: #eef; border-radius: 3px; padding: 0 0.35em; margin-right: 0.3em; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ids(tokens: list[int]) -> str:
    return " ".join(str(t) for t in tokens) + " "


def _steps(exposures: dict[str, Any] | None, before_step: int | None) -> str:
    if exposures is None:
        return ""
    steps = exposures["steps"]
    if not steps:
        partial = exposures.get("partial_steps") or []
        return "never trained whole" + (f" (cut by a row boundary at step {', '.join(map(str, partial[:5]))})" if partial else "")
    shown = ", ".join(map(str, steps[:12])) + (" …" if len(steps) > 12 else "")
    text = f"first seen at step {exposures['first_step']}; {exposures['times_seen']}× in training (steps {shown})"
    if before_step is not None:
        text += f"; {exposures['seen_before']}× before checkpoint step{before_step}"
    return text


def _context(window: dict[str, Any]) -> str:
    if "parts" in window:
        parts = window["parts"]
        return f"{_e(parts['before'])}<mark>{_e(parts['match'])}</mark>{_e(parts['after'])}"
    a, b = window["match_start"] - window["start"], window["match_stop"] - window["start"]
    ids = window["tokens"]
    return f"{_e(_ids(ids[:a]))}<mark>{_e(_ids(ids[a:b]))}</mark>{_e(_ids(ids[b:]))}"


def render_trace_html(trace: Any, title: str = "Trace of a model output") -> str:
    """The page for a :class:`lmscope.index.trace.Trace`."""
    data = trace.to_dict()
    settings = data["settings"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    facts = [f"{data['n_tokens']} output tokens", f"{len(data['spans'])} span{'s' if len(data['spans']) != 1 else ''} kept"]
    facts.append(f"of {data['n_candidate_spans']} candidates and {data['n_maximal_spans']} maximal spans")
    facts.append(f"{len(data['documents'])} document{'s' if len(data['documents']) != 1 else ''}")
    if data.get("model"):
        facts.insert(0, f"model {data['model']['spec']} (greedy)")
    if data.get("suite"):
        facts.append(f"training steps from {data['suite']}")
    out.append(f'<p class="subtitle">{_e(" · ".join(facts))}</p>')
    max_frequency = settings["max_frequency"] if settings["max_frequency"] is not None else "∞"
    out.append(
        '<p class="facts">'
        + _e(
            f"Spans: maximal exact matches of ≥ {settings['min_length']} tokens occurring ≤ {max_frequency} times in the corpus; "
            f"the top {settings['top_fraction']:g} of the output's length by {settings['rank_by']}; up to {settings['docs_per_span']} "
            f"occurrences each, with {settings['window']} tokens of context. Documents ranked by BM25 against the prompt and the output."
        )
        + "</p>"
    )
    if data.get("prompt") is not None or data["prompt_tokens"]:
        out.append("<h2>Prompt</h2>")
        out.append(f'<div class="text">{_e(data["prompt"] if data.get("prompt") is not None else _ids(data["prompt_tokens"]))}</div>')

    out.append("<h2>Output</h2>")
    pieces = []
    for segment in data["segments"]:
        text = segment.get("text")
        if text is None:
            text = _ids(data["tokens"][segment["start"] : segment["stop"]])
        covering = segment["spans"]
        if not covering:
            pieces.append(_e(text))
            continue
        level = min(len(covering), 3)
        label = "; ".join(f"span {k + 1}: {data['spans'][k]['count']}× in the corpus" for k in covering)
        pieces.append(f'<a href="#span-{covering[0] + 1}"><mark class="s{level}" title="{_e(label)}">{_e(text)}</mark></a>')
    out.append(f'<div class="text">{"".join(pieces)}</div>')

    out.append("<h2>Spans</h2>")
    if not data["spans"]:
        out.append(
            '<p class="facts">No span passed the filters: every maximal match is shorter than the minimum length, '
            "more frequent than the maximum frequency, or there is none.</p>"
        )
    documents = {d["doc_index"]: d for d in data["documents"]}
    for k, span in enumerate(data["spans"], start=1):
        shown = span.get("text", _ids(span["tokens"]))
        out.append(f'<h3 id="span-{k}">Span {k}: <code>{_e(shown)}</code></h3>')
        out.append(
            f'<p class="facts">tokens {span["start"]}–{span["stop"]} ({span["length"]} tokens), {span["count"]}× in the corpus, '
            f"unigram log-probability {span['unigram_logprob']:.2f}; {len(span['documents'])} occurrence"
            f"{'s' if len(span['documents']) != 1 else ''} shown</p>"
        )
        for ref in span["documents"]:
            doc = documents[ref["doc_index"]]
            match = next(m for m in doc["matches"] if m["span"] == k - 1 and m["offset"] == ref["offset"])
            tags = [f"#{doc['rank']} by BM25", doc["domain"], doc["split"], f"offset {ref['offset']}"]
            steps = _steps(match.get("exposures"), data.get("before_step"))
            out.append(
                f"<div><b>{_e(doc['doc_id'])}</b> "
                + "".join(f'<span class="tag">{_e(tag)}</span>' for tag in tags)
                + (f" {_e(steps)}" if steps else "")
                + f'<div class="ctx">{_context(match["window"])}</div></div>'
            )

    out.append("<h2>Documents, by BM25</h2>")
    if data["documents"]:
        with_steps = bool(data.get("suite"))
        head = ["rank", "BM25", "document", "domain", "split", "spans"] + (["first step", "training exposures"] if with_steps else [])
        out.append("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
        for doc in data["documents"]:
            cells = [
                f'<td class="num">{doc["rank"]}</td>',
                f'<td class="num">{doc["bm25"]:.3f}</td>',
                f"<td>{_e(doc['doc_id'])}</td>",
                f"<td>{_e(doc['domain'])}</td>",
                f"<td>{_e(doc['split'])}</td>",
                "<td>" + ", ".join(f'<a href="#span-{s + 1}">{s + 1}</a>' for s in doc["spans"]) + "</td>",
            ]
            if with_steps:
                first = doc.get("first_step")
                times = sum((m.get("exposures") or {}).get("times_seen", 0) for m in doc["matches"])
                cells += [f'<td class="num">{"never" if first is None else first}</td>', f'<td class="num">{times}</td>']
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
    else:
        out.append('<p class="facts">No documents: no span was kept.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_trace_html(trace: Any, path: str | os.PathLike[str], title: str = "Trace of a model output") -> Path:
    """Write :func:`render_trace_html` to ``path`` atomically; returns the path."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise LmscopeError(f"--html {str(target)!r} is a directory; give a file name such as trace.html.")
    atomic_write_text(target, render_trace_html(trace, title))
    return target
