"""``lmscope suites``: the real command in a subprocess, and the other forms in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-c", "from lmscope.cli import main; main()"]


def test_cli_subprocess_lists_log_spaced_checkpoints_and_rejects_bad_selectors() -> None:
    # both processes run at once: each spends most of its time importing
    good = subprocess.Popen(
        [*COMMAND, "suites", "checkpoints", "EleutherAI/pythia-70m", "--select", "log:5", "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    bad = subprocess.Popen(
        [*COMMAND, "suites", "checkpoints", "EleutherAI/pythia-70m", "--select", "lg:5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    rows = json.loads(out)
    assert [row["revision"] for row in rows] == ["step0", "step16", "step512", "step7000", "step143000"]
    assert rows[-1] == {"revision": "step143000", "step": 143000, "tokens_seen": 143000 * 2_097_152}
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert "lg:5" in err and "log:N" in err and "Traceback" not in err


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_cli_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["suites", "list", "--json"], capsys)
    assert code == 0
    suites = {suite["name"]: suite for suite in json.loads(out)}
    assert suites["pythia"]["checkpoints"] == 154 and suites["amber"]["checkpoints"] == 360
    assert suites["olmo-2"]["checkpoints"] is None
    code, out, _ = _run(["suites", "list"], capsys)
    assert code == 0 and "pythia-deduped" in out


def test_cli_local_suite_and_olmo_revision_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in (0, 50, 100):
        (tmp_path / "mini" / f"step{step}").mkdir(parents=True)
        (tmp_path / "mini" / f"step{step}" / "config.json").write_text("{}")
    code, out, _ = _run(["suites", "checkpoints", str(tmp_path / "mini"), "--select", "every:2", "--json"], capsys)
    assert code == 0
    assert json.loads(out) == [
        {"revision": "step0", "step": 0, "tokens_seen": None},
        {"revision": "step100", "step": 100, "tokens_seen": None},
    ]
    listing = tmp_path / "olmo.txt"
    listing.write_text("step2000-tokens8B\nstep1000-tokens4B\n")
    code, out, _ = _run(["suites", "checkpoints", "allenai/OLMo-1B-hf", "--revisions-file", str(listing), "--json"], capsys)
    assert code == 0
    assert [row["tokens_seen"] for row in json.loads(out)] == [4_000_000_000, 8_000_000_000]
    code, _, err = _run(["suites", "checkpoints", "olmo"], capsys)
    assert code == 2 and "--revisions-file" in err
