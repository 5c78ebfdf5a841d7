r"""Scoring an explanation: simulation (OpenAI), detection and fuzzing (EleutherAI delphi).

**Simulation.** Given only the explanation, the simulator model writes one ``token<TAB>activation`` line per
token of a record. At each activation the model's probabilities of the values 0 … 10 are read and their
expected value :math:`\hat a_t = \sum_v v\,p_t(v) / \sum_v p_t(v)` is its prediction. The score is the Pearson
correlation between :math:`\hat a` and the true activations over every token of the scored records together
(held-out top and quantile records and random ones), as OpenAI's ``ev_correlation_score``.

Two ways to read the probabilities, the same prompt either way:

- *forced* (a local model, :meth:`~lmscope.explain.local.LocalChatModel.forced_digit_distributions`): the
  token texts are written for the model and only the values are its own, so the table always has the right
  lines; "1" is split into 1 and 10 by one more step.
- *generated* (any chat-completions server): the model writes the whole table; each line's value is read
  from the ``top_logprobs`` of the token after the tab. Lines it does not write, or writes without a value,
  predict 0 and are counted as ``unparsed``. For a value starting with "1", P(10) is read from the next
  token only when the model wrote "1" there (the API gives alternatives at the written path only); otherwise
  all of P("1") counts as 1.

**Detection.** For each held-out activating record and each quiet record: "would the unit respond to this
text?" Yes/No, from the answer's first-token probabilities :math:`p = P(\text{yes}) / (P(\text{yes}) +
P(\text{no}))`; predicted positive when :math:`p > 1/2`.

**Fuzzing.** Each held-out activating record twice: once with its active tokens marked, once with as many
randomly chosen inactive tokens marked; "are the marked tokens ones the unit responds to?"

Both report balanced accuracy (the mean of the true-positive and true-negative rates: 0.5 is chance whatever
the class balance) and the AUROC of :math:`p`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.explain.backend import ChatModel, ChatResponse, complete_all
from lmscope.explain.prompts import detect_request, fuzz_request, simulate_request, visible
from lmscope.explain.records import ActivationRecord

VALUES = np.arange(11, dtype=np.float64)


@dataclass
class Simulation:
    """The simulator's expected activations (0 … 10 scale) per record, and how many lines it failed to write."""

    predicted: list[np.ndarray]
    unparsed: int = 0
    method: str = "forced"


def expected_values(probabilities: np.ndarray) -> np.ndarray:
    """``[n, 11]`` probabilities of the values 0 … 10 → ``[n]`` expected values."""
    p = np.asarray(probabilities, dtype=np.float64)
    total = p.sum(axis=1)
    return np.where(total > 0, p @ VALUES / np.where(total > 0, total, 1), 0.0)


def simulate(model: ChatModel, explanation: str, unit_kind: str, records: Sequence[ActivationRecord]) -> Simulation:
    """Predicted activations of ``records`` from ``explanation`` alone (forced on a local model, else generated)."""
    if hasattr(model, "forced_digit_distributions"):
        request = simulate_request(explanation, unit_kind)
        lines = [[visible(t) for t in r.tokens] for r in records]

        def compute() -> list[list[list[float]]]:
            return [d.tolist() for d in model.forced_digit_distributions(request, lines)]

        memo = getattr(model, "memo", None)
        payload = {"forced_digit_distributions": request.to_json(), "lines": lines}
        distributions = memo(payload, compute) if memo is not None else compute()
        return Simulation([expected_values(np.asarray(d).reshape(-1, 11)) for d in distributions], 0, "forced")
    responses = complete_all(model, [simulate_request(explanation, unit_kind, r.tokens, max_tokens=8 * len(r.tokens) + 16)
                                     for r in records])
    predicted, unparsed = [], 0
    for record, response in zip(records, responses):
        values, missing = parse_simulation(response, len(record.tokens))
        predicted.append(values)
        unparsed += missing
    return Simulation(predicted, unparsed, "generated")


def _value_distribution(top: dict[str, float], after: dict[str, float] | None) -> np.ndarray | None:
    """Probabilities of 0 … 10 from a position's alternatives (and, if "1" was written, the next position's)."""
    p = np.zeros(11)
    for token, logprob in top.items():
        key = token.strip()
        if len(key) == 1 and key.isdigit():
            p[int(key)] += math.exp(logprob)
        elif key == "10":
            p[10] += math.exp(logprob)
    if after is not None and p[1] > 0:
        zero = sum(math.exp(lp) for t, lp in after.items() if t.strip() == "0" or t == "0")
        total = sum(math.exp(lp) for lp in after.values())
        share = min(zero / total, 1.0) if total > 0 else 0.0
        p[10] += p[1] * share
        p[1] *= 1 - share
    return p if p.sum() > 0 else None


def parse_simulation(response: ChatResponse, n_tokens: int) -> tuple[np.ndarray, int]:
    """Expected values of a generated ``token<TAB>value`` table: ``[n_tokens]`` and the number of lines missing.

    The ``i``-th line that holds a tab gives token ``i``'s value, read from the ``top_logprobs`` of the first
    token after its tab (the written digit when there are no log-probabilities).
    """
    values = np.zeros(n_tokens)
    found = 0
    tokens = response.tokens
    text = ""
    line_has_value = False
    for i, token in enumerate(tokens):
        if text.endswith("\t") and not line_has_value and found < n_tokens:
            after = tokens[i + 1].top if token.token.strip() == "1" and i + 1 < len(tokens) and tokens[i + 1].token.strip() == "0" else None
            p = _value_distribution(token.top or {token.token: token.logprob}, after)
            if p is not None:
                values[found] = float(expected_values(p[None])[0])
            found += 1
            line_has_value = True
        text += token.token
        if "\n" in token.token:
            line_has_value = False
    if not tokens:  # no log-probabilities: read the digits of the text
        for line in response.text.split("\n"):
            if "\t" in line and found < n_tokens:
                digits = line.rsplit("\t", 1)[1].strip()
                values[found] = min(float(digits), 10.0) if digits.isdigit() else 0.0
                found += 1
    return values, n_tokens - found


def correlation(truth: Sequence[Sequence[float]], predicted: Sequence[np.ndarray]) -> float:
    """Pearson correlation over all tokens of all records together (NaN when either side is constant)."""
    x = np.concatenate([np.asarray(t, dtype=np.float64) for t in truth]) if truth else np.zeros(0)
    y = np.concatenate([np.asarray(p, dtype=np.float64) for p in predicted]) if predicted else np.zeros(0)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def yes_probability(response: ChatResponse) -> float:
    """P(yes) / (P(yes) + P(no)) from the first answer token's alternatives (0.5 when neither appears)."""
    if not response.tokens:
        word = response.text.strip().lower()
        return 1.0 if word.startswith("yes") else 0.0 if word.startswith("no") else 0.5
    yes = no = 0.0
    for token, logprob in response.tokens[0].top.items():
        word = token.strip().lower()
        if word == "yes":
            yes += math.exp(logprob)
        elif word == "no":
            no += math.exp(logprob)
    return yes / (yes + no) if yes + no > 0 else 0.5


def balanced_accuracy(labels: Sequence[bool], p: Sequence[float]) -> float:
    """Mean of the true-positive and true-negative rates of ``p > 1/2`` (NaN without both classes)."""
    labels, predicted = np.asarray(labels, bool), np.asarray(p, np.float64) > 0.5
    if labels.all() or not labels.any():
        return float("nan")
    return float((predicted[labels].mean() + (~predicted[~labels]).mean()) / 2)


def auroc(labels: Sequence[bool], p: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half."""
    labels, scores = np.asarray(labels, bool), np.asarray(p, np.float64)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@dataclass
class Classification:
    """A yes/no scorer's answers: one probability of yes per example, and the truth."""

    labels: list[bool]
    p_yes: list[float]

    @property
    def balanced_accuracy(self) -> float:
        return balanced_accuracy(self.labels, self.p_yes)

    @property
    def auroc(self) -> float:
        return auroc(self.labels, self.p_yes)


def detection(model: ChatModel, explanation: str, unit_kind: str, positives: Sequence[ActivationRecord],
              negatives: Sequence[ActivationRecord]) -> Classification:
    """Delphi's detection: does the unit respond to this text at all?"""
    records = list(positives) + list(negatives)
    responses = complete_all(model, [detect_request(explanation, unit_kind, r) for r in records])
    return Classification([True] * len(positives) + [False] * len(negatives), [yes_probability(r) for r in responses])


def fuzz_marks(record: ActivationRecord, max_activation: float, rng: np.random.Generator) -> tuple[list[bool], list[bool]]:
    """The record's active tokens (1 or more on the 0 … 10 scale), and as many of its inactive tokens drawn at random."""
    levels = np.asarray(record.discretised(max_activation))
    active = levels > 0
    if not active.any():
        active[int(np.argmax(record.activations))] = True
    inactive = np.flatnonzero(~active)
    wrong = np.zeros(len(levels), bool)
    if len(inactive):
        wrong[rng.choice(inactive, size=min(int(active.sum()), len(inactive)), replace=False)] = True
    return active.tolist(), wrong.tolist()


def fuzzing(model: ChatModel, explanation: str, unit_kind: str, records: Sequence[ActivationRecord], max_activation: float,
            seed: int = 0) -> Classification:
    """Delphi's fuzzing: are the marked tokens the ones the unit responds to (right marks vs random ones)?"""
    rng = np.random.default_rng(seed)
    requests, labels = [], []
    for record in records:
        right, wrong = fuzz_marks(record, max_activation, rng)
        requests += [fuzz_request(explanation, unit_kind, record, right), fuzz_request(explanation, unit_kind, record, wrong)]
        labels += [True, False]
    responses = complete_all(model, requests)
    return Classification(labels, [yes_probability(r) for r in responses])


def score_all(model: ChatModel, explanation: str, unit_kind: str, records: Any, seed: int = 0) -> dict[str, Any]:
    """Simulation, detection and fuzzing of one explanation on one unit's held-out records (:class:`UnitRecords`)."""
    scored = list(records.holdout) + list(records.random)
    simulation = simulate(model, explanation, unit_kind, scored)
    truth = [r.activations for r in scored]  # correlation is scale-free: the true activations, not their 0 … 10 levels
    detect = detection(model, explanation, unit_kind, records.holdout, records.quiet)
    fuzz = fuzzing(model, explanation, unit_kind, records.holdout, records.max_activation, seed=seed)
    return {
        "simulation": correlation(truth, simulation.predicted),
        "simulation_unparsed": simulation.unparsed,
        "simulation_method": simulation.method,
        "detection": detect.balanced_accuracy,
        "detection_auroc": detect.auroc,
        "fuzzing": fuzz.balanced_accuracy,
        "fuzzing_auroc": fuzz.auroc,
        "predicted": [p.tolist() for p in simulation.predicted],
        "detection_p_yes": detect.p_yes,
        "fuzzing_p_yes": fuzz.p_yes,
    }
