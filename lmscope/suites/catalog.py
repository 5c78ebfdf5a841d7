"""Suite catalogs: which models a suite has, and its checkpoints as (revision, step, tokens seen).

Four kinds of suite are known:

- **Pythia** (``pythia``, ``pythia-deduped``): every checkpoint is known offline. All ten
  sizes (14m … 12b), standard and deduplicated, publish the same 154 revisions:
  ``step0``, ``step1``, ``step2``, ``step4`` … ``step512``, then ``step1000`` … ``step143000``
  every 1000. A step is 1024 sequences × 2048 tokens = 2,097,152 tokens.
- **OLMo** (``olmo``, ``olmo-2``): revision names carry their own step and token count
  (``step1000-tokens4B``, ``stage1-step928646-tokens3896B``,
  ``stage2-ingredient1-step11931-tokens50B``) and are parsed by :func:`parse_olmo_revision`.
  There are thousands of them per model and no offline list, so the checkpoints of an OLMo
  suite come from a revision list the caller gives (``revisions=``, a file read with
  :func:`read_revisions_file`, or :func:`hub_revisions` where the hub is reachable).
- **LLM360 Amber** (``amber``): ``ckpt_000`` … ``ckpt_359``; see :data:`AMBER_TOKENS_PER_CHUNK`
  for how step and tokens seen are derived, and what of that is an assumption.
- **Local suites**: a directory of Hugging Face model directories named ``stepN``, directly
  inside it, under ``checkpoints/``, or one level deeper per size
  (``SUITE_DIR/SIZE/checkpoints/stepN``). See :func:`local_suite`.

Everything that names a suite — :func:`suite_checkpoints`, :func:`resolve_suite`, the CLI —
accepts a suite name, a model id of a catalogued suite, or a local directory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from lmscope.errors import LmscopeError
from lmscope.suites.revisions import local_revisions, nearest_revisions

Family = Literal["pythia", "olmo", "amber", "local"]


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint.

    Attributes:
        revision: the name to load it by (hub branch, or local checkpoint directory name).
        step: training progress in the suite's own unit — optimizer steps for Pythia, OLMo and
            local suites (for OLMo's ``stage2…`` names, steps within that stage, as the name
            gives them), data chunks trained for Amber (see :data:`AMBER_TOKENS_PER_CHUNK`).
        tokens_seen: training tokens seen when the checkpoint was saved, or ``None`` when the
            suite does not say (a local suite without ``tokens_per_step`` in its ``suite.json``).
    """

    revision: str
    step: int
    tokens_seen: int | None

    def to_dict(self) -> dict[str, Any]:
        """``{"revision", "step", "tokens_seen"}``, the row the CLI prints."""
        return asdict(self)


@dataclass(frozen=True)
class SuiteModel:
    """One model of a suite.

    Attributes:
        model_id: hub id (``EleutherAI/pythia-70m``) or, for a local suite, its directory.
        size: size label as the suite writes it (``70m``, ``1.4b``, ``7b``).
    """

    model_id: str
    size: str


@dataclass(frozen=True)
class Suite:
    """A family of models trained together, and how their checkpoints are named.

    Attributes:
        name: the suite's name (``pythia``, ``olmo-2``, ``amber``; a local suite's directory name).
        family: ``pythia``, ``olmo``, ``amber`` or ``local``; decides how revisions are listed and parsed.
        description: one line for humans.
        models: the suite's models, smallest first.
        tokens_per_step: training tokens per unit of :attr:`Checkpoint.step`, when one constant fits.
        revisions: every checkpoint revision, in training order, when they can be listed
            offline; empty for OLMo, whose revisions the caller supplies.
        root: for a local suite, its directory.
    """

    name: str
    family: Family
    description: str
    models: tuple[SuiteModel, ...]
    tokens_per_step: int | None = None
    revisions: tuple[str, ...] = ()
    root: Path | None = field(default=None, compare=False)

    def model(self, model_id: str) -> SuiteModel | None:
        """The model of this suite with ``model_id`` (case-insensitive, as the hub treats ids)."""
        wanted = model_id.lower()
        return next((m for m in self.models if m.model_id.lower() == wanted), None)

    def checkpoint(self, revision: str) -> Checkpoint:
        """The checkpoint named ``revision``; :class:`LmscopeError` naming the nearest if there is none."""
        if self.family == "olmo":
            return parse_olmo_revision(revision)
        if revision not in self.revisions:
            raise LmscopeError(
                f"revision {revision!r} does not exist in suite {self.name!r}; the nearest that exist are "
                f"{', '.join(nearest_existing(revision, self.revisions))}."
            )
        return _checkpoint_of(self, revision)

    def checkpoints(self, revisions: Sequence[str] | None = None) -> list[Checkpoint]:
        """The suite's checkpoints in training order.

        Args:
            revisions: the revisions that exist, when the catalog cannot list them (OLMo).
                For a suite whose revisions are known, the given ones must be among them,
                and only those are returned.
        """
        if revisions is None:
            if not self.revisions and self.family == "local":
                listing = ", ".join(model.model_id for model in self.models)
                raise LmscopeError(
                    f"the sizes of local suite {self.name!r} differ in checkpoints or tokens_per_step; "
                    f"name one size directory: {listing}."
                )
            if not self.revisions:
                raise LmscopeError(
                    f"the revisions of suite {self.name!r} cannot be listed offline; give them with "
                    "--revisions-file FILE (one revision name per line) or --from-hub with a model id."
                )
            revisions = self.revisions
        checkpoints = [self.checkpoint(revision) for revision in dict.fromkeys(revisions)]
        return sorted(checkpoints, key=_training_order)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what ``lmscope suites list --json`` prints)."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "models": [asdict(model) for model in self.models],
            "checkpoints": len(self.revisions) if self.revisions else None,
            "tokens_per_step": self.tokens_per_step,
            **({"root": str(self.root)} if self.root is not None else {}),
        }


def _training_order(checkpoint: Checkpoint) -> tuple[str, int, str]:
    # OLMo names carry a stage prefix (stage1-, stage2-ingredient1-) whose steps restart;
    # order by prefix first so that each stage stays contiguous. Other suites have no prefix.
    return (_olmo_prefix(checkpoint.revision), checkpoint.step, checkpoint.revision)


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def nearest_existing(wanted: str, available: Sequence[str], n: int = 3) -> list[str]:
    """The ``n`` revisions in ``available`` closest to ``wanted``.

    By step for ``stepN`` names (:func:`lmscope.suites.revisions.nearest_revisions`); by trailing
    number when every name ends in one (``ckpt_012`` is nearest ``ckpt_011`` and ``ckpt_013``);
    else by spelling.
    """
    available = list(available)
    wanted_number = _TRAILING_NUMBER.search(wanted)
    numbers = [_TRAILING_NUMBER.search(revision) for revision in available]
    if _STEP_IN_NAME.search(wanted) is None and wanted_number and available and all(numbers):
        target = int(wanted_number.group(1))
        ranked = sorted(zip(numbers, available), key=lambda pair: (abs(int(pair[0].group(1)) - target), pair[1]))
        return [revision for _, revision in ranked[:n]]
    return nearest_revisions(wanted, available, n=n)


# --- Pythia -------------------------------------------------------------------------------

PYTHIA_SIZES: tuple[str, ...] = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
"""Pythia sizes. All ten exist in both the standard and the ``-deduped`` variant on the hub
(``EleutherAI/pythia-14m-deduped`` and ``-31m-deduped`` included), with the same 154 revisions.
The earlier ``-v0`` models and the PolyPythia seeds (``pythia-160m-seed1`` …) are not catalogued."""

PYTHIA_TOKENS_PER_STEP = 1024 * 2048
"""2,097,152: every Pythia step is a batch of 1024 sequences of 2048 tokens."""

PYTHIA_STEPS: tuple[int, ...] = (0, *(2**i for i in range(10)), *range(1000, 143_001, 1000))
"""The 154 checkpointed steps: 0, 1, 2, 4, …, 512, then every 1000 up to 143000."""


def _pythia_suite(deduped: bool) -> Suite:
    suffix = "-deduped" if deduped else ""
    corpus = "the deduplicated Pile" if deduped else "the Pile"
    return Suite(
        name=f"pythia{suffix}",
        family="pythia",
        description=f"EleutherAI Pythia trained on {corpus} in one shared data order; 154 checkpoints, 300B tokens.",
        models=tuple(SuiteModel(f"EleutherAI/pythia-{size}{suffix}", size) for size in PYTHIA_SIZES),
        tokens_per_step=PYTHIA_TOKENS_PER_STEP,
        revisions=tuple(f"step{step}" for step in PYTHIA_STEPS),
    )


# --- OLMo ---------------------------------------------------------------------------------

_OLMO_REVISION = re.compile(
    r"^(?:(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*?)-)?step(?P<step>\d+)"
    r"-tokens(?P<tokens>\d+(?:\.\d+)?)(?P<unit>[KMBT])$"
)
_TOKEN_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_olmo_revision(revision: str) -> Checkpoint:
    """Parse an OLMo revision name into a :class:`Checkpoint`.

    Accepted form: ``[PREFIX-]stepN-tokensX<unit>`` where the unit is ``K``, ``M``, ``B``
    (10⁹) or ``T`` (10¹²) and ``X`` may have decimals, e.g. ``step1000-tokens4B`` → (1000, 4·10⁹),
    ``stage1-step928646-tokens3896B`` → (928646, 3.896·10¹²),
    ``stage2-ingredient1-step11931-tokens50B`` → (11931, 5·10¹⁰).

    Token counts are taken as the name rounds them (``tokens4B`` is exactly 4,000,000,000),
    not recomputed from the batch size. For ``stage2…`` names both step and tokens count from
    the start of that stage, exactly as the name gives them.
    """
    match = _OLMO_REVISION.match(revision)
    if match is None:
        raise LmscopeError(
            f"revision {revision!r} is not an OLMo checkpoint name; OLMo revisions look like "
            "step1000-tokens4B, stage1-step928646-tokens3896B or stage2-ingredient1-step11931-tokens50B."
        )
    tokens = int(Decimal(match["tokens"]) * _TOKEN_UNITS[match["unit"]])
    return Checkpoint(revision=revision, step=int(match["step"]), tokens_seen=tokens)


def _olmo_prefix(revision: str) -> str:
    match = _OLMO_REVISION.match(revision)
    return (match["prefix"] or "") if match else ""


_OLMO_1_MODELS = (
    ("allenai/OLMo-1B-hf", "1b"),
    ("allenai/OLMo-1B-0724-hf", "1b"),
    ("allenai/OLMo-7B-hf", "7b"),
    ("allenai/OLMo-7B-Twin-2T-hf", "7b"),
    ("allenai/OLMo-7B-0424-hf", "7b"),
    ("allenai/OLMo-7B-0724-hf", "7b"),
)
_OLMO_2_MODELS = (
    ("allenai/OLMo-2-0425-1B", "1b"),
    ("allenai/OLMo-2-1124-7B", "7b"),
    ("allenai/OLMo-2-1124-13B", "13b"),
    ("allenai/OLMo-2-0325-32B", "32b"),
)


# --- LLM360 Amber -------------------------------------------------------------------------

AMBER_CHUNKS = 360
AMBER_SEQUENCES_PER_CHUNK = 1_706_976
AMBER_TOKENS_PER_CHUNK = AMBER_SEQUENCES_PER_CHUNK * 2048
"""3,495,886,848 tokens per Amber data chunk; × 360 chunks = 1.2585T, the published ~1.26T.

Amber's data was cut into 360 chunks of 1,706,976 sequences of 2049 token ids (2048 trained
positions each; these figures are the constants ``TRAIN_EXAMPLES_PER_CHUNK`` and ``N_CHUNKS``
of LLM360's ``amber-train`` code) and a checkpoint was saved after each chunk.

Assumptions, stated because the checkpoint names do not carry them:

- ``ckpt_k`` was saved *after* chunk ``k`` was trained, so ``tokens_seen = (k + 1) ×
  AMBER_TOKENS_PER_CHUNK``;
- Amber's optimizer-step count per checkpoint is not published in the names, so
  :attr:`Checkpoint.step` counts **data chunks trained** (``k + 1``), and
  ``Suite.tokens_per_step`` is the tokens per chunk.
"""


def _amber_suite() -> Suite:
    return Suite(
        name="amber",
        family="amber",
        description="LLM360 Amber 7B (LLaMA architecture); 360 checkpoints, one per data chunk, ~1.26T tokens.",
        models=(SuiteModel("LLM360/Amber", "7b"),),
        tokens_per_step=AMBER_TOKENS_PER_CHUNK,
        revisions=tuple(f"ckpt_{k:03d}" for k in range(AMBER_CHUNKS)),
    )


# --- the catalog --------------------------------------------------------------------------

_SUITES: tuple[Suite, ...] = (
    _pythia_suite(deduped=False),
    _pythia_suite(deduped=True),
    Suite(
        name="olmo",
        family="olmo",
        description="AI2 OLMo 1 (Transformers-format repos) trained on Dolma; revisions are parsed from names.",
        models=tuple(SuiteModel(model_id, size) for model_id, size in _OLMO_1_MODELS),
    ),
    Suite(
        name="olmo-2",
        family="olmo",
        description="AI2 OLMo 2 (stage 1 pretraining, stage 2 mid-training ingredients); revisions are parsed from names.",
        models=tuple(SuiteModel(model_id, size) for model_id, size in _OLMO_2_MODELS),
    ),
    _amber_suite(),
)


def list_suites() -> list[Suite]:
    """The built-in suites (local suites are found by path, see :func:`local_suite`)."""
    return list(_SUITES)


def catalog_suite(model_id: str) -> Suite | None:
    """The built-in suite that has ``model_id`` (case-insensitive), or ``None``."""
    return next((suite for suite in _SUITES if suite.model(model_id) is not None), None)


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def check_hub_revision(model_id: str, revision: str) -> None:
    """Refuse, before any download, a revision that a catalogued model cannot have.

    Pythia and Amber revisions must be one of the catalog's (or ``main``); OLMo revisions
    must parse with :func:`parse_olmo_revision` (or be ``main``). A full 40-hex commit hash
    is always let through. Models outside the catalog are not checked.
    """
    suite = catalog_suite(model_id)
    if suite is None or revision == "main" or _COMMIT.match(revision):
        return
    if suite.family == "olmo":
        try:
            parse_olmo_revision(revision)
        except LmscopeError:
            raise LmscopeError(
                f"revision {revision!r} of {model_id} is not an OLMo checkpoint name; use main or a name like "
                "step1000-tokens4B, stage1-step928646-tokens3896B or stage2-ingredient1-step11931-tokens50B."
            ) from None
        return
    if revision not in suite.revisions:
        nearest = ", ".join(nearest_existing(revision, suite.revisions))
        raise LmscopeError(
            f"revision {revision!r} does not exist for {model_id}; the nearest that exist are {nearest} "
            "(main is the final checkpoint)."
        )


# --- local suites -------------------------------------------------------------------------

SUITE_FILE = "suite.json"
"""Optional metadata of a local suite: ``SUITE_DIR/suite.json``, and ``SUITE_DIR/SIZE/suite.json``
whose keys win for that size.

Keys read (all optional): ``"name"`` (str), ``"size"`` (str, the size label of a one-model
suite) and ``"tokens_per_step"`` (int, training tokens per optimizer step), so that
``tokens_seen = step × tokens_per_step``. Without ``tokens_per_step`` a local checkpoint's
``tokens_seen`` is ``None`` (unknown), never a guess."""

_STEP_IN_NAME = re.compile(r"step(\d+)")


def _read_suite_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmscopeError(f"{path}:{err.lineno} is not valid JSON ({err.msg}); fix or delete the file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LmscopeError(f"{path} could not be read ({err}); check its permissions and encoding.") from None
    if not isinstance(data, dict):
        raise LmscopeError(f"{path} must hold a JSON object such as {{\"tokens_per_step\": 65536}}.")
    tokens = data.get("tokens_per_step")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise LmscopeError(f"{path}: tokens_per_step must be a positive integer, not {tokens!r}.")
    for key in ("name", "size"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise LmscopeError(f"{path}: {key} must be a string, not {data[key]!r}.")
    return data


def _local_checkpoint(revision: str, tokens_per_step: int | None) -> Checkpoint | None:
    """A local checkpoint's step (and tokens, from an OLMo-style name or ``tokens_per_step``); ``None`` if no step."""
    try:
        parsed = parse_olmo_revision(revision)  # stepN, or OLMo-style stepN-tokensXB
    except LmscopeError:
        match = _STEP_IN_NAME.search(revision)
        if match is None:
            return None
        parsed = Checkpoint(revision, int(match.group(1)), None)
    if parsed.tokens_seen is None and tokens_per_step is not None:
        return Checkpoint(revision, parsed.step, parsed.step * tokens_per_step)
    return parsed


def _step_revisions(revisions: Sequence[str]) -> tuple[str, ...]:
    found = [c for revision in revisions if (c := _local_checkpoint(revision, None)) is not None]
    return tuple(c.revision for c in sorted(found, key=_training_order))


def local_suite(directory: str | os.PathLike[str]) -> Suite:
    """Describe a local suite directory.

    Layouts recognised (a checkpoint is a directory holding ``config.json``):

    - ``DIR/stepN/`` or ``DIR/checkpoints/stepN/`` — one model; its size is ``suite.json``'s
      ``"size"`` if given, else the directory name (so ``SUITE_DIR/SIZE`` names one size);
    - ``DIR/SIZE/stepN/`` or ``DIR/SIZE/checkpoints/stepN/`` — one model per size.

    A checkpoint's step is the number after ``step`` in its name; names in OLMo form
    (``step1000-tokens4B``) also give tokens seen. Otherwise tokens seen come from
    ``tokens_per_step`` in :data:`SUITE_FILE` (the directory's own, else its parent's, so
    that ``SUITE_DIR/SIZE`` inherits the suite's), or are ``None``. Model directories whose
    names carry no step number (``final``) are not part of the checkpoint sequence; load them
    directly with ``DIR@NAME``.

    A multi-size suite lists its checkpoints only when every size has the same revisions and
    the same ``tokens_per_step``; otherwise name one size directory.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise LmscopeError(f"local suite directory {str(root)!r} does not exist; check the path.")
    own_meta = _read_suite_file(root / SUITE_FILE)
    own = local_revisions(root)
    if own:
        meta = {**_read_suite_file(root.resolve().parent / SUITE_FILE), **own_meta}
        sizes = [(root, str(meta.get("size") or root.resolve().name), own, meta.get("tokens_per_step"))]
    else:
        meta = own_meta
        sizes = []
        for child in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
            revisions = local_revisions(child)
            if revisions:
                child_meta = {**meta, **_read_suite_file(child / SUITE_FILE)}
                sizes.append((child, str(child_meta.get("size") or child.name), revisions, child_meta.get("tokens_per_step")))
    if not sizes:
        if (root / "config.json").is_file():
            raise LmscopeError(
                f"{str(root)!r} is a single model, not a suite of checkpoints; a suite holds stepN/ directories "
                "(directly, under checkpoints/, or under SIZE/checkpoints/)."
            )
        raise LmscopeError(
            f"{str(root)!r} holds no checkpoints; expected DIR/stepN/config.json, DIR/checkpoints/stepN/config.json "
            "or DIR/SIZE/checkpoints/stepN/config.json."
        )
    revision_lists = {_step_revisions(revisions) for _, _, revisions, _ in sizes}
    token_rates = {tokens for _, _, _, tokens in sizes}
    shared = len(revision_lists) == 1 and len(token_rates) == 1
    return Suite(
        name=str(meta.get("name") or root.resolve().name),
        family="local",
        description=f"local suite at {root}",
        models=tuple(SuiteModel(str(path), size) for path, size, _, _ in sizes),
        tokens_per_step=token_rates.pop() if shared else None,
        revisions=revision_lists.pop() if shared else (),
        root=root,
    )


# --- hub listing --------------------------------------------------------------------------


def read_revisions_file(path: str | os.PathLike[str]) -> list[str]:
    """Revision names from a text file: one per line; blank lines and ``#`` comments ignored."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmscopeError(f"revisions file {str(path)!r} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LmscopeError(f"revisions file {str(path)!r} could not be read ({err}).") from None
    revisions = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    revisions = [revision for revision in revisions if revision]
    if not revisions:
        raise LmscopeError(f"revisions file {str(path)!r} lists no revisions; write one revision name per line.")
    return revisions


def hub_revisions(model_id: str) -> list[str]:
    """The branch names of a hub model (its checkpoint revisions), asked of the Hugging Face hub.

    Needs the network; ``main`` is left out.
    """
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        raise LmscopeError(
            f"the revisions of {model_id} cannot be listed while the hub is offline (HF_HUB_OFFLINE=1); "
            "give them with --revisions-file FILE instead."
        )
    try:
        refs = HfApi().list_repo_refs(model_id)
    except Exception as err:  # network, authentication, missing repository: all one answer for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmscopeError(
            f"the revisions of {model_id} could not be listed from the hub ({first}); "
            "check the model id and the network, or give them with --revisions-file FILE."
        ) from None
    return [branch.name for branch in refs.branches if branch.name != "main"]


# --- one entry point ----------------------------------------------------------------------


def resolve_suite(name: str) -> tuple[Suite, SuiteModel | None]:
    """The suite that ``name`` designates, and the model when ``name`` names one.

    ``name`` is a suite name (``pythia``, ``pythia-deduped``, ``olmo``, ``olmo-2``, ``amber``),
    a model id of a catalogued suite (``EleutherAI/pythia-70m``), or a local directory
    (a suite, or one size of it).
    """
    by_name = {suite.name: suite for suite in _SUITES}
    if name.lower() in by_name:
        return by_name[name.lower()], None
    suite = catalog_suite(name)
    if suite is not None:
        return suite, suite.model(name)
    if os.path.isdir(os.path.expanduser(name)):
        suite = local_suite(name)
        return suite, (suite.models[0] if len(suite.models) == 1 else None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LmscopeError(f"local suite directory {name!r} does not exist; check the path.")
    if "/" not in name:
        raise LmscopeError(
            f"{name!r} is not a known suite; known suites are {', '.join(by_name)}, or give a local suite directory."
        )
    raise LmscopeError(
        f"model {name!r} is not in a catalogued suite ({', '.join(by_name)}); give a suite name, a model of one "
        "such as EleutherAI/pythia-70m, or a local suite directory."
    )


def suite_checkpoints(
    name: str,
    select: str | None = None,
    revisions: Sequence[str] | None = None,
) -> list[Checkpoint]:
    """The checkpoints of a suite, model or local directory, optionally narrowed by a selector.

    Args:
        name: see :func:`resolve_suite`.
        select: a checkpoint selector (``all``, ``log:N``, ``every:K``, ``step1000,2000``,
            ``1000..5000``; see :mod:`lmscope.suites.selectors`); ``None`` means all.
        revisions: the revisions that exist, for suites that cannot list them offline (OLMo);
            for other suites the given revisions must exist and only they are kept.
    """
    from lmscope.suites.selectors import select_checkpoints

    suite, _ = resolve_suite(name)
    checkpoints = suite.checkpoints(revisions)
    if not checkpoints:
        raise LmscopeError(f"{name!r} has no checkpoints; give at least one revision.")
    return select_checkpoints(checkpoints, select, where=name) if select is not None else checkpoints


def _checkpoint_of(suite: Suite, revision: str) -> Checkpoint:
    if suite.family == "pythia":
        step = int(revision[len("step") :])
        return Checkpoint(revision, step, step * PYTHIA_TOKENS_PER_STEP)
    if suite.family == "amber":
        chunks = int(revision[len("ckpt_") :]) + 1
        return Checkpoint(revision, chunks, chunks * AMBER_TOKENS_PER_CHUNK)
    checkpoint = _local_checkpoint(revision, suite.tokens_per_step)
    assert checkpoint is not None, "local suites list only revisions with a step number"
    return checkpoint
