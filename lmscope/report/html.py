"""A self-contained HTML page: text, tables and PNG figures embedded as ``data:`` URIs.

The page loads nothing from anywhere (no scripts, fonts, stylesheets or images by URL), so it
opens offline, attaches to an e-mail, and stays the same forever. Every piece of text is
HTML-escaped here; callers pass plain strings.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscope.fsio import atomic_write_text

STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.subtitle { color: #666; margin-top: 0; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
.reading { font-weight: 600; margin: 0.3em 0; }
.explain { color: #555; margin: 0.2em 0 0.6em 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f5f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f5f5f7; padding: 0.05em 0.3em; border-radius: 3px; }
.missing { color: #a33; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.9em; font-size: 0.88em; }
.card h4 { margin: 0 0 0.3em 0; font-size: 1.05em; }
.card .facts { color: #555; margin: 0 0 0.4em 0; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all;
       background: #fafafa; padding: 0.15em 0.3em; margin: 0.15em 0; border-left: 3px solid #ccc; }
.ctx mark { background: #ffd54f; padding: 0 1px; }
.passage { font-size: 1.05em; padding: 0.5em 0.8em; }
.ctx .src { color: #888; font-family: -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 0.85em; }
.bars { display: flex; align-items: flex-end; height: 36px; gap: 1px; margin: 0.3em 0; }
.bars span { background: #5c6bc0; width: 8px; display: inline-block; }
.scored span { border-radius: 2px; }
.tok { font-family: ui-monospace, Menlo, Consolas, monospace; background: #eef; padding: 0 3px; margin-right: 3px; border-radius: 3px; }
"""


@dataclass
class Figure:
    """A PNG with a title, a one-line reading (what it shows, in numbers) and how to read it."""

    title: str
    png: str | os.PathLike[str]
    reading: str | None
    explain: str


@dataclass
class Table:
    """Rows of dicts (same keys) shown as an HTML table; floats formatted to ``digits`` significant digits."""

    title: str
    rows: Sequence[Mapping[str, Any]]
    digits: int = 4


@dataclass
class Example:
    """One context where a feature fired: its tokens (text pieces), which one is the example, and where it came from."""

    pieces: Sequence[str]
    index: int
    activation: float
    source: str


@dataclass
class FeatureCard:
    """One SAE feature: a title, facts, a histogram (bar heights), top logit tokens and examples."""

    title: str
    facts: str
    histogram: Sequence[int]
    top_tokens: Sequence[str]
    bottom_tokens: Sequence[str]
    examples: Sequence[Example]


@dataclass
class Cards:
    """A grid of feature cards under a title."""

    title: str
    cards: Sequence[FeatureCard]


@dataclass
class Passage:
    """A text shown whole, some of its pieces marked (e.g. the spans of an output found in the training data)."""

    title: str
    pieces: Sequence[tuple[str, bool]]
    """``(text, marked)`` in order."""
    caption: str = ""


@dataclass
class ScoredText:
    """Tokens shaded by a signed score (green: positive, red: negative; the strongest fully), with a caption."""

    title: str
    tokens: Sequence[str]
    scores: Sequence[float]
    caption: str = ""


@dataclass
class ActivationLine:
    """One record of a unit: its tokens shaded by activation on the 0 … 10 scale, and optionally the simulator's guess."""

    tokens: Sequence[str]
    levels: Sequence[float]
    """True activation per token, 0 … 10."""
    predicted: Sequence[float] | None
    """The simulator's expected activation per token, 0 … 10 (``None``: not scored)."""
    source: str


@dataclass
class ExplanationCard:
    """One explained unit: its explanation, its scores against the shuffled baseline, and records with provenance."""

    title: str
    explanation: str
    facts: str
    records: Sequence[ActivationLine]


@dataclass
class ExplanationCards:
    """A grid of explanation cards under a title."""

    title: str
    cards: Sequence[ExplanationCard]


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    items: list[Figure | Table | Cards | Passage | ScoredText | ExplanationCards] = field(default_factory=list)


def _cell(value: Any, digits: int) -> tuple[str, bool]:
    if isinstance(value, float):
        return f"{value:.{digits}g}", True
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}", True
    return html.escape("" if value is None else str(value)), False


def _table(table: Table) -> str:
    if not table.rows:
        return f"<h3>{html.escape(table.title)}</h3><p class='missing'>(no rows)</p>"
    keys = list(table.rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = []
    for row in table.rows:
        cells = []
        for key in keys:
            text, numeric = _cell(row.get(key), table.digits)
            cells.append(f"<td class='num'>{text}</td>" if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(Path(figure.png).read_bytes()).decode("ascii")
    reading = f"<p class='reading'>{html.escape(figure.reading)}</p>" if figure.reading else ""
    return (f"<figure><h3>{html.escape(figure.title)}</h3>{reading}"
            f"<img alt='{html.escape(figure.title, quote=True)}' src='data:image/png;base64,{data}'>"
            f"<figcaption class='explain'>{html.escape(figure.explain)}</figcaption></figure>")


def _example(example: Example) -> str:
    pieces = [html.escape(p) for p in example.pieces]
    if 0 <= example.index < len(pieces):
        pieces[example.index] = f"<mark>{pieces[example.index]}</mark>"
    return (f"<div class='ctx'>{''.join(pieces)} <span class='src'>{example.activation:.3g} · "
            f"{html.escape(example.source)}</span></div>")


def _card(card: FeatureCard) -> str:
    top = max(card.histogram, default=0) or 1
    bars = "".join(f"<span style='height:{max(1, round(36 * c / top)) if c else 0}px'></span>" for c in card.histogram)
    tokens = ""
    if card.top_tokens:
        tokens += "<p>promotes " + "".join(f"<span class='tok'>{html.escape(t)}</span>" for t in card.top_tokens) + "</p>"
    if card.bottom_tokens:
        tokens += "<p>suppresses " + "".join(f"<span class='tok'>{html.escape(t)}</span>" for t in card.bottom_tokens) + "</p>"
    examples = "".join(_example(e) for e in card.examples)
    histogram = f"<div class='bars' title='log10 activation histogram'>{bars}</div>" if card.histogram else ""
    return (f"<div class='card'><h4>{html.escape(card.title)}</h4><p class='facts'>{html.escape(card.facts)}</p>"
            f"{histogram}{tokens}{examples}</div>")


def _cards(cards: Cards) -> str:
    return f"<h3>{html.escape(cards.title)}</h3><div class='cards'>{''.join(_card(c) for c in cards.cards)}</div>"


def _passage(passage: Passage) -> str:
    text = "".join(f"<mark>{html.escape(t)}</mark>" if marked else html.escape(t) for t, marked in passage.pieces)
    caption = f"<p class='explain'>{html.escape(passage.caption)}</p>" if passage.caption else ""
    return f"<h3>{html.escape(passage.title)}</h3><div class='ctx passage'>{text}</div>{caption}"


def _scored(item: ScoredText) -> str:
    top = max((abs(v) for v in item.scores), default=0.0) or 1.0
    spans = []
    for token, value in zip(item.tokens, item.scores):
        alpha = min(1.0, abs(value) / top)
        colour = f"rgba(46,125,50,{alpha:.2f})" if value >= 0 else f"rgba(198,40,40,{alpha:.2f})"
        spans.append(f"<span style='background:{colour}' title='{value:.3g}'>{html.escape(token)}</span>")
    caption = f"<p class='explain'>{html.escape(item.caption)}</p>" if item.caption else ""
    return f"<h3>{html.escape(item.title)}</h3><div class='ctx scored'>{''.join(spans)}</div>{caption}"


def _levels(tokens: Sequence[str], levels: Sequence[float], rgb: str) -> str:
    spans = []
    for token, level in zip(tokens, levels):
        alpha = min(1.0, max(0.0, float(level) / 10))
        spans.append(f"<span style='background:rgba({rgb},{alpha:.2f})' title='{float(level):.1f}'>{html.escape(token)}</span>")
    return "".join(spans)


def _explanation_card(card: ExplanationCard) -> str:
    lines = []
    for record in card.records:
        true = f"<div class='ctx scored'>{_levels(record.tokens, record.levels, '255,152,0')} <span class='src'>{html.escape(record.source)}</span></div>"
        guess = "" if record.predicted is None else \
            f"<div class='ctx scored'>{_levels(record.tokens, record.predicted, '92,107,192')} <span class='src'>simulated</span></div>"
        lines.append(true + guess)
    return (f"<div class='card'><h4>{html.escape(card.title)}</h4><p><b>{html.escape(card.explanation)}</b></p>"
            f"<p class='facts'>{html.escape(card.facts)}</p>{''.join(lines)}</div>")


def _explanation_cards(cards: ExplanationCards) -> str:
    return f"<h3>{html.escape(cards.title)}</h3><div class='cards'>{''.join(_explanation_card(c) for c in cards.cards)}</div>"


def _item(item: Figure | Table | Cards | Passage | ScoredText | ExplanationCards) -> str:
    if isinstance(item, ExplanationCards):
        return _explanation_cards(item)
    if isinstance(item, ScoredText):
        return _scored(item)
    if isinstance(item, Figure):
        return _figure(item)
    if isinstance(item, Cards):
        return _cards(item)
    if isinstance(item, Passage):
        return _passage(item)
    return _table(item)


def render_html(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page as one string."""
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='subtitle'>{html.escape(subtitle)}</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        parts += [_item(item) for item in section.items]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike[str], title: str, subtitle: str, sections: Sequence[Section]) -> Path:
    """Render and write the page atomically; returns its path."""
    path = Path(path)
    atomic_write_text(path, render_html(title, subtitle, sections))
    return path
