"""Suite catalogs: Pythia, OLMo name parsing, Amber, local suites, hub revision checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmscope.errors import LmscopeError
from lmscope.models.loading import resolve_local
from lmscope.models.spec import parse_spec
from lmscope.suites import catalog
from lmscope.suites.catalog import (
    Checkpoint,
    check_hub_revision,
    list_suites,
    local_suite,
    parse_olmo_revision,
    read_revisions_file,
    resolve_suite,
    suite_checkpoints,
)

# --- Pythia -------------------------------------------------------------------------------


def test_pythia_has_the_154_published_revisions() -> None:
    checkpoints = suite_checkpoints("pythia")
    assert len(checkpoints) == 154
    assert checkpoints[0] == Checkpoint("step0", 0, 0)
    assert checkpoints[-1].revision == "step143000"
    # independent statement of the schedule: 0, powers of two to 512, then every 1000
    expected = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + [1000 * k for k in range(1, 144)]
    assert [c.step for c in checkpoints] == expected
    assert [c.revision for c in checkpoints] == [f"step{s}" for s in expected]


def test_pythia_tokens_seen_is_step_times_1024_sequences_of_2048() -> None:
    by_revision = {c.revision: c for c in suite_checkpoints("EleutherAI/pythia-70m")}
    assert by_revision["step1000"].tokens_seen == 2_097_152_000
    assert by_revision["step143000"].tokens_seen == 299_892_736_000  # the "300B tokens" of the paper
    assert by_revision["step1"].tokens_seen == 1024 * 2048


def test_pythia_suites_have_ten_sizes_each_and_resolve_by_model_id() -> None:
    suites = {suite.name: suite for suite in list_suites()}
    assert {"pythia", "pythia-deduped", "olmo", "olmo-2", "amber"} <= set(suites)
    assert len(suites["pythia"].models) == 10 and len(suites["pythia-deduped"].models) == 10
    assert all(m.model_id.endswith("-deduped") for m in suites["pythia-deduped"].models)
    suite, model = resolve_suite("EleutherAI/Pythia-1.4B-deduped")  # hub ids are case-insensitive
    assert suite.name == "pythia-deduped" and model is not None and model.size == "1.4b"
    assert suite_checkpoints("EleutherAI/pythia-12b") == suite_checkpoints("pythia-deduped")


def test_unknown_suite_name_lists_the_known_ones() -> None:
    with pytest.raises(LmscopeError, match="not a known suite; known suites are pythia, pythia-deduped, olmo, olmo-2, amber"):
        suite_checkpoints("pythya")
    with pytest.raises(LmscopeError, match="not in a catalogued suite"):
        suite_checkpoints("someone/some-model")


# --- OLMo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "step", "tokens"),
    [
        ("step1000-tokens4B", 1000, 4_000_000_000),
        ("stage1-step928646-tokens3896B", 928_646, 3_896_000_000_000),
        ("stage2-ingredient1-step11931-tokens50B", 11_931, 50_000_000_000),
        ("step0-tokens0B", 0, 0),
        ("step20-tokens1.5T", 20, 1_500_000_000_000),
        ("step7-tokens300M", 7, 300_000_000),
    ],
)
def test_olmo_revision_names_parse_into_step_and_tokens(name: str, step: int, tokens: int) -> None:
    assert parse_olmo_revision(name) == Checkpoint(name, step, tokens)


@pytest.mark.parametrize("name", ["main", "step5", "step-tokens4B", "step1000-tokens4X", "ckpt_010", "step1000tokens4B"])
def test_olmo_parser_rejects_other_names_with_examples(name: str) -> None:
    with pytest.raises(LmscopeError, match="stage1-step928646-tokens3896B"):
        parse_olmo_revision(name)


def test_olmo_suite_needs_a_revision_list_and_orders_stages(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="--revisions-file"):
        suite_checkpoints("olmo-2")
    listing = tmp_path / "revisions.txt"
    listing.write_text(
        "# OLMo-2-1124-7B branches\n"
        "stage2-ingredient1-step11931-tokens50B\n"
        "stage1-step928646-tokens3896B\n"
        "\n"
        "stage1-step1000-tokens5B  # early\n"
        "stage1-step1000-tokens5B\n"
    )
    revisions = read_revisions_file(listing)
    checkpoints = suite_checkpoints("allenai/OLMo-2-1124-7B", revisions=revisions)
    assert [c.revision for c in checkpoints] == [
        "stage1-step1000-tokens5B",
        "stage1-step928646-tokens3896B",
        "stage2-ingredient1-step11931-tokens50B",
    ]
    assert checkpoints[1].tokens_seen == 3_896_000_000_000
    with pytest.raises(LmscopeError, match="not an OLMo checkpoint name"):
        suite_checkpoints("olmo", revisions=["step1000-tokens4B", "latest"])


def test_revisions_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="does not exist"):
        read_revisions_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(LmscopeError, match="lists no revisions"):
        read_revisions_file(empty)


def test_hub_listing_drops_main_and_refuses_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    class Refs:
        branches = [type("B", (), {"name": n})() for n in ("main", "step1000-tokens4B", "step2000-tokens8B")]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_refs", lambda self, repo_id: Refs())
    assert catalog.hub_revisions("allenai/OLMo-1B-hf") == ["step1000-tokens4B", "step2000-tokens8B"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmscopeError, match="offline"):
        catalog.hub_revisions("allenai/OLMo-1B-hf")


# --- Amber --------------------------------------------------------------------------------


def test_amber_has_360_chunk_checkpoints_totalling_about_1_26t_tokens() -> None:
    checkpoints = suite_checkpoints("LLM360/Amber")
    assert len(checkpoints) == 360
    assert checkpoints[0].revision == "ckpt_000" and checkpoints[-1].revision == "ckpt_359"
    per_chunk = 1_706_976 * 2048  # sequences per chunk × trained positions per sequence
    assert checkpoints[0] == Checkpoint("ckpt_000", 1, per_chunk)
    assert checkpoints[-1].tokens_seen == 360 * per_chunk
    assert abs(checkpoints[-1].tokens_seen - 1.26e12) / 1.26e12 < 0.01


# --- check_hub_revision -------------------------------------------------------------------


def test_check_hub_revision_names_the_nearest_pythia_revisions() -> None:
    with pytest.raises(LmscopeError) as err:
        check_hub_revision("EleutherAI/pythia-70m", "step1500")
    message = str(err.value)
    assert "step1500" in message and "step1000" in message and "step2000" in message
    for fine in ("step3000", "main", "0123456789abcdef0123456789abcdef01234567"):
        check_hub_revision("EleutherAI/pythia-70m", fine)


def test_check_hub_revision_olmo_amber_and_unknown_models() -> None:
    check_hub_revision("allenai/OLMo-2-1124-7B", "stage1-step928646-tokens3896B")
    check_hub_revision("allenai/OLMo-2-1124-7B", "main")
    with pytest.raises(LmscopeError, match="not an OLMo checkpoint name"):
        check_hub_revision("allenai/OLMo-2-1124-7B", "step1500")
    with pytest.raises(LmscopeError, match="ckpt_359, ckpt_358"):
        check_hub_revision("LLM360/Amber", "ckpt_360")
    with pytest.raises(LmscopeError, match="ckpt_012"):
        check_hub_revision("LLM360/Amber", "ckpt_12")
    check_hub_revision("someone/anything", "whatever")  # not catalogued: not checked


# --- local suites -------------------------------------------------------------------------


def _checkpoint_dir(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")


def test_local_suite_discovers_step_directories(tmp_path: Path) -> None:
    for name in ("step200", "step0", "step1000", "final"):
        _checkpoint_dir(tmp_path / "run" / name)
    (tmp_path / "run" / "step300").mkdir()  # no config.json: not a checkpoint
    checkpoints = suite_checkpoints(str(tmp_path / "run"))
    assert checkpoints == [Checkpoint("step0", 0, None), Checkpoint("step200", 200, None), Checkpoint("step1000", 1000, None)]
    (tmp_path / "run" / "suite.json").write_text(json.dumps({"tokens_per_step": 4096, "name": "mini"}))
    assert [c.tokens_seen for c in suite_checkpoints(str(tmp_path / "run"))] == [0, 200 * 4096, 1000 * 4096]
    assert local_suite(tmp_path / "run").name == "mini"
    # every listed checkpoint loads through the model-spec path of lmscope.models.loading
    for checkpoint in checkpoints:
        spec = parse_spec(f"{tmp_path / 'run'}@{checkpoint.revision}")
        assert resolve_local(spec) == tmp_path / "run" / checkpoint.revision


def test_local_suite_per_size_layout(tmp_path: Path) -> None:
    root = tmp_path / "mini"
    for size in ("70m", "160m"):
        for step in (0, 10, 20):
            _checkpoint_dir(root / size / "checkpoints" / f"step{step}")
    (root / "suite.json").write_text(json.dumps({"tokens_per_step": 1000}))
    suite = local_suite(root)
    assert sorted(m.size for m in suite.models) == ["160m", "70m"]
    assert [c.tokens_seen for c in suite_checkpoints(str(root))] == [0, 10_000, 20_000]
    assert [c.revision for c in suite_checkpoints(str(root / "70m"))] == ["step0", "step10", "step20"]
    assert suite_checkpoints(str(root / "70m"))[-1].tokens_seen == 20_000  # inherits the suite's suite.json
    _checkpoint_dir(root / "160m" / "checkpoints" / "step30")
    with pytest.raises(LmscopeError, match="name one size directory"):
        suite_checkpoints(str(root))
    assert suite_checkpoints(str(root / "160m"))[-1].step == 30


def test_local_suite_errors(tmp_path: Path) -> None:
    with pytest.raises(LmscopeError, match="does not exist"):
        suite_checkpoints(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmscopeError, match="holds no checkpoints"):
        suite_checkpoints(str(tmp_path / "empty"))
    _checkpoint_dir(tmp_path / "single")
    with pytest.raises(LmscopeError, match="single model"):
        suite_checkpoints(str(tmp_path / "single"))
    _checkpoint_dir(tmp_path / "bad" / "step0")
    (tmp_path / "bad" / "suite.json").write_text('{\n  "tokens_per_step": ,\n}')
    with pytest.raises(LmscopeError, match=r"suite\.json:2 is not valid JSON"):
        suite_checkpoints(str(tmp_path / "bad"))
    (tmp_path / "bad" / "suite.json").write_text('{"tokens_per_step": "lots"}')
    with pytest.raises(LmscopeError, match="positive integer"):
        suite_checkpoints(str(tmp_path / "bad"))
