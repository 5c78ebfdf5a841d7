"""kronfluence, run on the same model, rows, queries and settings as lmscope's influence code: the reference scores.

kronfluence (Bae et al., the public implementation of Grosse et al. 2023) is driven through its
``Task`` API exactly as its language-model examples do: the training loss is the summed next-token
loss of a row (targets sampled from the model when kronfluence asks for ``sample=True``), the
measurement is the summed loss of the completion tokens. It wraps the model's modules in place, so it
gets a deep copy.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("TQDM_DISABLE", "1")


def kronfluence_scores(model: torch.nn.Module, train_rows: np.ndarray, queries: list[tuple[list[int], list[int]]], module_names: list[str], *,
                       strategy: str, damping: float | None, empirical_fisher: bool, batch_size: int = 8,
                       query_rank: int | None = None, timings: dict[str, float] | None = None) -> np.ndarray:
    """Pairwise scores ``[Q, N]`` from kronfluence (``damping=None``: its heuristic)."""
    import time

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    vocab = model.config.vocab_size

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float().reshape(-1, vocab)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            else:
                labels = batch["labels"].reshape(-1)
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float().reshape(-1, vocab)
            return F.cross_entropy(logits, batch["labels"].reshape(-1), reduction="sum", ignore_index=-100)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch: Any) -> None:
            return None

    class Rows(torch.utils.data.Dataset):
        def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return self.items[i]

    rows = torch.as_tensor(np.asarray(train_rows).astype(np.int64))
    train = Rows([{"input_ids": r[:-1], "labels": r[1:]} for r in rows])
    width = max(len(p) + len(c) for p, c in queries) - 1
    query_items = []
    for prompt, completion in queries:
        ids = torch.tensor(list(prompt) + list(completion))
        input_ids = torch.zeros(width, dtype=torch.long)
        labels = torch.full((width,), -100, dtype=torch.long)
        input_ids[: len(ids) - 1] = ids[:-1]
        labels[len(prompt) - 1 : len(ids) - 1] = ids[len(prompt):]
        query_items.append({"input_ids": input_ids, "labels": labels})
    task = LanguageModelTask()
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="lmscope", model=wrapped, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        started = time.perf_counter()
        analyzer.fit_all_factors("factors", train, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher))
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores("scores", "factors", Rows(query_items), train, per_device_query_batch_size=len(query_items),
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(damping_factor=damping, query_gradient_low_rank=query_rank))
        scored = time.perf_counter()
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    if timings is not None:
        timings.update(fit=fitted - started, score=scored - fitted)
    return scores
