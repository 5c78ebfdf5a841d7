"""Checkpoint audit: are a suite's checkpoints all there, distinct and finite?

For each expected checkpoint of a model the audit finds its weights (a local
checkpoint directory, or the Hugging Face cache — it never downloads), hashes the
tensors, and reports:

- **missing** revisions: expected by the catalog (or by a mini suite's
  ``suite.json`` ``checkpoint_steps``) but not present;
- **duplicate** revisions: byte-identical weights under different revisions —
  Pythia's issue tracker documents a model where 76 of 154 revisions equal the
  final weights, which silently flattens any curve drawn across training;
- **non-finite** weights: NaN or ±Inf entries.

The weights hash is over tensor contents, not file bytes: for every tensor in name
order, ``sha256(name, dtype, shape, raw bytes)``. Two files that differ only in
metadata or tensor order hash the same; the ``safetensors`` and PyTorch pickle
(``weights_only``) formats of the same weights hash the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmscope.errors import LmscopeError
from lmscope.progress import Progress, no_progress
from lmscope.suites.catalog import Checkpoint, SuiteModel, resolve_suite
from lmscope.suites.selectors import select_checkpoints


@dataclass
class CheckpointAudit:
    """The audit of one checkpoint.

    Attributes:
        revision, step, tokens_seen: the checkpoint.
        status: ``ok``, ``missing``, ``duplicate`` (same weights as an earlier revision) or ``nonfinite``.
        weights_sha256: hash of the tensor contents (``None`` when missing).
        parameters: number of weight entries.
        nonfinite: number of NaN/Inf entries.
        duplicate_of: the first revision (in step order) with the same weights.
        path: where the weights were read.
    """

    revision: str
    step: int
    tokens_seen: int | None
    status: str
    weights_sha256: str | None = None
    parameters: int = 0
    nonfinite: int = 0
    duplicate_of: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in directory.glob("pytorch_model*.bin"))
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint's weight files, in name order, one file at a time."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in sorted(handle.keys()):
                        yield name, handle.get_tensor(name)
            except SafetensorError as err:
                raise LmscopeError(f"weights file {str(path)!r} is corrupt or truncated ({err}); re-download or re-save it.") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises many types for a damaged pickle
                raise LmscopeError(f"weights file {str(path)!r} could not be read ({type(err).__name__}); re-download it.") from None
            for name in sorted(state):
                yield name, state[name]


def hash_weights(directory: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(sha256 of tensor contents, number of entries, number of non-finite entries)`` of a checkpoint directory."""
    directory = Path(directory)
    files = _weight_files(directory)
    if not files:
        raise LmscopeError(f"{str(directory)!r} holds no *.safetensors or pytorch_model*.bin weights.")
    digest = hashlib.sha256()
    entries = nonfinite = 0
    for name, tensor in _iter_tensors(files):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        entries += tensor.numel()
        if tensor.is_floating_point():
            nonfinite += int((~torch.isfinite(tensor)).sum())
    return digest.hexdigest(), entries, nonfinite


def _local_checkpoint_dir(model_dir: Path, revision: str) -> Path | None:
    for candidate in (model_dir / revision, model_dir / "checkpoints" / revision):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _hub_checkpoint_dir(model_id: str, revision: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _expected_local_steps(model_dir: Path) -> list[int] | None:
    """``checkpoint_steps`` from the suite.json of a model directory or of its suite, if recorded."""
    for path in (model_dir / "suite.json", model_dir.parent / "suite.json"):
        if path.is_file():
            try:
                steps = json.loads(path.read_text()).get("checkpoint_steps")
            except json.JSONDecodeError:
                raise LmscopeError(f"{str(path)!r} is not valid JSON; fix or remove it.") from None
            if steps is not None:
                return [int(step) for step in steps]
    return None


def audit_checkpoints(spec: str, select: str | None = None, progress: Progress = no_progress) -> list[CheckpointAudit]:
    """Audit the checkpoints of one model: a catalogued hub model (cache only) or a local suite size directory.

    Args:
        spec: ``EleutherAI/pythia-70m`` (reads the local Hugging Face cache, never downloads) or
            ``SUITE_DIR/SIZE`` (a local suite's model directory).
        select: a checkpoint selector (``log:8``, ``every:10``, …); ``None`` audits all.

    Returns one :class:`CheckpointAudit` per expected checkpoint, in step order.
    """
    suite, model = resolve_suite(spec)
    if model is None:
        sizes = ", ".join(m.model_id for m in suite.models) or "none"
        raise LmscopeError(f"{spec!r} names a whole suite; audit one model of it ({sizes}).")
    expected = _expected_checkpoints(suite, model, spec)
    if select is not None:
        expected = select_checkpoints(expected, select, where=spec)
    local = suite.family == "local"
    results: list[CheckpointAudit] = []
    first_with_hash: dict[str, str] = {}
    for checkpoint in expected:
        directory = _local_checkpoint_dir(Path(model.model_id), checkpoint.revision) if local else _hub_checkpoint_dir(model.model_id, checkpoint.revision)
        row = CheckpointAudit(checkpoint.revision, checkpoint.step, checkpoint.tokens_seen, "missing")
        if directory is not None and _weight_files(directory):
            sha, entries, nonfinite = hash_weights(directory)
            row.weights_sha256, row.parameters, row.nonfinite, row.path = sha, entries, nonfinite, str(directory)
            row.status = "nonfinite" if nonfinite else "ok"
            if sha in first_with_hash:
                row.duplicate_of = first_with_hash[sha]
                row.status = "duplicate" if row.status == "ok" else row.status
            else:
                first_with_hash[sha] = checkpoint.revision
        results.append(row)
        progress("audit checkpoints", 1, len(expected))
    return results


def _expected_checkpoints(suite: object, model: SuiteModel, spec: str) -> list[Checkpoint]:
    present = suite.checkpoints()  # type: ignore[attr-defined]
    if getattr(suite, "family", None) != "local":
        return present
    steps = _expected_local_steps(Path(model.model_id))
    if steps is None:
        return present
    by_step = {c.step: c for c in present}
    tokens_per_step = next((c.tokens_seen // c.step for c in present if c.step and c.tokens_seen is not None), None)
    return [
        by_step.get(step, Checkpoint(f"step{step}", step, step * tokens_per_step if tokens_per_step is not None else None))
        for step in sorted(set(steps) | set(by_step))
    ]


def audit_summary(rows: list[CheckpointAudit]) -> dict[str, object]:
    """Counts and lists for the report: missing, duplicate groups (with whether they equal the final weights), non-finite."""
    present = [row for row in rows if row.status != "missing"]
    final = present[-1].weights_sha256 if present else None
    groups: dict[str, list[str]] = {}
    for row in present:
        groups.setdefault(row.weights_sha256 or "", []).append(row.revision)
    duplicate_groups = [
        {"revisions": revisions, "equal_to_final": sha == final} for sha, revisions in groups.items() if len(revisions) > 1
    ]
    return {
        "checkpoints": len(rows),
        "present": len(present),
        "missing": [row.revision for row in rows if row.status == "missing"],
        "duplicate_groups": duplicate_groups,
        "equal_to_final": sum(len(g["revisions"]) for g in duplicate_groups if g["equal_to_final"]),
        "nonfinite": [row.revision for row in rows if row.nonfinite],
        "distinct_weights": len(groups),
    }
