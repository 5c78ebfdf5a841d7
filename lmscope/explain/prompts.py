"""The prompts: explain a unit from its records, simulate its activations, detect it, judge marked tokens.

Every prompt is a short chat (a system message with the task, a user message with the material) built from
records alone, so the same prompt goes to a local model or a server. Tokens the unit is active on are shown
between ``<<`` and ``>>``; activations are on OpenAI's 0 … 10 scale (:func:`lmscope.explain.records.discretise`).
The wording is lmscope's own; the formats follow OpenAI's explainer and simulator (one ``token<TAB>activation``
line per token) and EleutherAI delphi's detection and fuzzing scorers (a yes/no question per example).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmscope.explain.backend import ChatRequest, chat
from lmscope.explain.records import ActivationRecord

UNIT_NAMES = {"neuron": "neuron", "feature": "feature"}

EXPLAIN_SYSTEM = (
    "You are studying one {unit} inside a language model. Each example below is a piece of text in which the "
    "tokens where the {unit} is active are marked <<like this>>, followed by those tokens and how strongly the "
    "{unit} responds to each, from 1 (weak) to 10 (strongest). Find what the marked tokens have in common and "
    "describe it in one short phrase. Reply with the phrase only."
)  # no example phrases: a small explainer copies the first one it is shown
SIMULATE_SYSTEM = (
    "You predict how strongly one {unit} of a language model responds to each token of a text, given a "
    "description of what the {unit} responds to. Write one line per token: the token, a tab, and a whole "
    "number from 0 (no response) to 10 (strongest response). Most tokens get 0."
)
DETECT_SYSTEM = (
    "You are given a description of what one {unit} of a language model responds to, and a piece of text. "
    "Answer Yes if the {unit}, as described, would respond to some token of the text, and No otherwise. "
    "Answer with one word: Yes or No."
)
FUZZ_SYSTEM = (
    "You are given a description of what one {unit} of a language model responds to, and a piece of text in "
    "which some tokens are marked <<like this>>. Answer Yes if the marked tokens are ones the {unit}, as "
    "described, responds to, and No if they are not. Answer with one word: Yes or No."
)


def visible(token: str) -> str:
    """A token as one line of the simulator's table: newlines and tabs written as ``\\n`` and ``\\t``."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def marked_text(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The text with each marked run of tokens between ``<<`` and ``>>``."""
    out, inside = [], False
    for token, mark in zip(tokens, marked):
        if mark and not inside:
            out.append("<<")
        if not mark and inside:
            out.append(">>")
        inside = mark
        out.append(token)
    if inside:
        out.append(">>")
    return "".join(out)


def explain_request(records: Sequence[ActivationRecord], max_activation: float, unit_kind: str, *,
                    max_tokens: int = 32) -> ChatRequest:
    """Ask for one short explanation of a unit from its ``records``."""
    blocks = []
    for i, record in enumerate(records, 1):
        levels = record.discretised(max_activation)
        text = marked_text(record.tokens, [v > 0 for v in levels])
        active = ", ".join(f"{record.tokens[t].strip() or repr(record.tokens[t])} ({v})" for t, v in enumerate(levels) if v > 0)
        blocks.append(f"Example {i}: {text.strip()}\nActive tokens: {active or 'none'}")
    user = "\n\n".join(blocks) + f"\n\nWhat does this {unit_kind} respond to?"
    return chat(("system", EXPLAIN_SYSTEM.format(unit=unit_kind)), ("user", user), max_tokens=max_tokens, stop=("\n",))


def clean_explanation(text: str) -> str:
    """The first sentence of an answer's first line, without quotes, a trailing full stop or a leading "This neuron responds to"."""
    line = text.strip().split("\n")[0].strip()
    end = line.find(". ")
    line = (line[:end] if end > 0 else line).strip().strip("\"'`").strip()
    for lead in ("this neuron responds to", "this feature responds to", "the neuron responds to", "the feature responds to",
                 "it responds to", "responds to"):
        if line.lower().startswith(lead):
            line = line[len(lead):].strip(" :")
    return line.rstrip(".").strip() or "(no explanation)"


# One worked example before the real question: without it a small model tends to count up line by line.
SIMULATE_EXAMPLE = ("the names of animals, most strongly \"cat\"",
                    ["My", " cat", " and", " my", " dog", " sleep", " all", " day", "."], [0, 10, 0, 0, 6, 0, 0, 0, 0])


def _simulate_question(explanation: str, unit_kind: str, tokens: Sequence[str] | None) -> str:
    user = f"Description of the {unit_kind}: {explanation}\n\n"
    if tokens is None:
        return user + "Predict the response to each token of the text, one line per token."
    return user + "Text, one token per line:\n" + "\n".join(visible(t) for t in tokens) + \
        "\n\nWrite each of these tokens again, one per line, each followed by a tab and its predicted response."


def simulate_request(explanation: str, unit_kind: str, tokens: Sequence[str] | None = None, *, max_tokens: int = 512) -> ChatRequest:
    """The simulator's question, after one worked example.

    Without ``tokens`` the text is not listed: the answer's lines are forced on the model (a local model), and
    only the values are its own. With ``tokens`` the text is listed for a model that writes the table itself.
    """
    example, example_tokens, example_values = SIMULATE_EXAMPLE
    example_answer = "".join(f"{visible(t)}\t{v}\n" for t, v in zip(example_tokens, example_values))
    listed = None if tokens is None else example_tokens
    return chat(("system", SIMULATE_SYSTEM.format(unit=unit_kind)),
                ("user", _simulate_question(example, unit_kind, listed)), ("assistant", example_answer),
                ("user", _simulate_question(explanation, unit_kind, tokens)), max_tokens=max_tokens, top_logprobs=20)


def detect_request(explanation: str, unit_kind: str, record: ActivationRecord) -> ChatRequest:
    """Would the described unit respond anywhere in this record's text?"""
    user = f"Description of the {unit_kind}: {explanation}\n\nText: {''.join(record.tokens).strip()}\n\nDoes the {unit_kind} respond to this text?"
    return chat(("system", DETECT_SYSTEM.format(unit=unit_kind)), ("user", user), max_tokens=1, top_logprobs=20)


def fuzz_request(explanation: str, unit_kind: str, record: ActivationRecord, marked: Sequence[bool]) -> ChatRequest:
    """Are the marked tokens of this record ones the described unit responds to?"""
    user = (f"Description of the {unit_kind}: {explanation}\n\nText: {marked_text(record.tokens, marked).strip()}\n\n"
            f"Are the marked tokens ones this {unit_kind} responds to?")
    return chat(("system", FUZZ_SYSTEM.format(unit=unit_kind)), ("user", user), max_tokens=1, top_logprobs=20)
