"""``lmscope replay`` on Pythia, OLMo and Amber data given by flags or replay.json: JSON output against brute force, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.cli import main
from replay_fixtures import PLANTED, build_amber, build_olmo, build_pythia

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_cli_subprocess_replays_a_pythia_step(tmp_path: Path) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=20, seq_len=15)
    command = [sys.executable, "-c", "from lmscope.cli import main; main()", "replay", "pythia", "--data", str(data.prefix)]
    good = subprocess.run([*command, "--batch-size", "4", "--seq-len", "15", "--step", "3", "--json", "--tokens"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    out = json.loads(good.stdout)
    assert out["source"] == "pythia" and out["row_range"] == [0, 4] and out["row_length"] == 16
    assert [row["tokens"] for row in out["rows"]] == [r.tolist() for r in data.rows[12:16]]
    assert [row["position"] for row in out["rows"]] == [12, 13, 14, 15]


def test_cli_pythia_table_find_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = build_pythia(tmp_path / "pile", n_rows=20, seq_len=15, plant=[(6, 2), (17, 5)])
    flags = ["--data", str(data.prefix), "--batch-size", "4", "--seq-len", "15"]
    code, out, err = _run(["replay", "pythia", "--step", "1", *flags], capsys)
    assert code == 0, err
    assert "step 1" in out and "document ends" in out and " ".join(str(t) for t in data.rows[4][:4]) in out
    code, out, err = _run(["replay", "find", "--suite", "pythia", *flags, "--token-ids", ",".join(map(str, PLANTED)), "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    assert [(m["step"], m["row"], m["row_offset"]) for m in found["matches"]] == [(1, 6, 2), (4, 17, 5)]
    assert found["first_step"] == 1 and found["rows_scanned"] == 20 and "doc_id" not in found["matches"][0]
    code, out, _ = _run(["replay", "find", "--suite", "pythia", *flags, "--token-ids", ",".join(map(str, PLANTED)), "--steps", "2:5"], capsys)
    assert code == 0 and "first at step 4" in " ".join(out.split())
    for args, message in [
        (["replay", "pythia", "--step", "5", *flags], "holds 5 steps (0 … 4)"),
        (["replay", "pythia", "--step", "0"], "lacks data"),
        (["replay", "pythia", "--step", "0", "--data", str(tmp_path / "nowhere")], "has neither nowhere.bin nor shards"),
        (["replay", "pythia", "--step", "0", *flags[:2]], "holds 16 tokens, not 2049"),
        (["replay", "find", "doc-1", "--suite", "pythia", *flags], "carries no document ids"),
        (["replay", "find", "--suite", "pythia", *flags, "--token-ids", "1,x"], "not a list of integers"),
        (["replay", "find", "--suite", "pythia", *flags, "--text", "hello"], "--text needs --tokenizer"),
        (["replay", "pythia", "--step", "0", *flags, "--eos-id", "end"], "--eos-id 'end' is not a token id"),
    ]:
        code, _, err = _run(args, capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, (args, err)


def test_cli_olmo_from_flags_and_data_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = build_olmo(tmp_path / "olmo", lengths=[100, 37, 64], seq_len=16)
    listing = tmp_path / "paths.txt"
    listing.write_text("# token files in config order\n" + "\n".join(str(f) for f in data.files) + "\n")
    flags = ["--global-indices", str(data.indices_path), "--data-list", str(listing), "--batch-size", "3", "--seq-len", "16"]
    code, out, err = _run(["replay", "olmo", "--step", "2", *flags, "--json", "--tokens"], capsys)
    assert code == 0, err
    out_json = json.loads(out)
    want = data.indices[6:9].tolist()
    assert [row["row"] for row in out_json["rows"]] == want
    assert [row["tokens"] for row in out_json["rows"]] == [data.instances[i].tolist() for i in want]
    assert all(row["origin"].startswith(str(tmp_path / "olmo")) for row in out_json["rows"])
    needle = data.instances[want[1]][3:7].tolist()
    code, out, err = _run(["replay", "find", "--suite", "olmo", *flags, "--token-ids", ",".join(map(str, needle)), "--json"], capsys)
    assert code == 0, err
    truth = [
        (p // 3, int(data.indices[p]), o)
        for p in range(len(data.indices) // 3 * 3)
        for o in range(16 - 3)
        if data.instances[data.indices[p]][o : o + 4].tolist() == needle
    ]
    assert [(m["step"], m["row"], m["row_offset"]) for m in json.loads(out)["matches"]] == truth and truth
    code, _, err = _run(["replay", "olmo", "--step", "0", "--global-indices", str(data.indices_path), "--data-list", str(listing), "--seq-len", "16"], capsys)
    assert code == 2 and "--batch-size" in err


def test_cli_amber_rows_limit_and_replay_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = build_amber(tmp_path / "amber", n_chunks=2, rows_per_chunk=9, seq_len=9)
    (tmp_path / "amber" / "replay.json").write_text(json.dumps({"format": "amber", "data": ".", "chunks": 2, "rows_per_chunk": 9, "seq_len": 9}))
    code, out, err = _run(["replay", str(tmp_path / "amber"), "--step", "1", "--rows", "2:8", "--limit", "4", "--json", "--tokens"], capsys)
    assert code == 0, err
    out_json = json.loads(out)
    assert out_json["row_range"] == [2, 6] and out_json["limited"] and out_json["rows_in_step"] == 9
    assert [row["tokens"] for row in out_json["rows"]] == [ids for ids, _ in data.chunks[1][2:6]]
    assert [row["segments"][0]["domain"] for row in out_json["rows"]] == [source for _, source in data.chunks[1][2:6]]
    assert [row["position"] for row in out_json["rows"]] == [11, 12, 13, 14]
    code, out, err = _run(["replay", str(tmp_path / "amber"), "--step", "0"], capsys)
    assert code == 0 and "tokens by domain" in out
    code, _, err = _run(["replay", str(tmp_path / "amber"), "--step", "2"], capsys)
    assert code == 2 and "holds 2 steps" in " ".join(err.split())
    code, _, err = _run(["replay", str(tmp_path / "amber"), "--step", "1", "--rows", "9:12"], capsys)
    assert code == 2 and "starts beyond step 1's batch of 9 rows" in " ".join(err.split())


def test_cli_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["replay", "--help"], capsys)
    assert code == 0 and "step" in out and "find" in out and "stepN" in out
    code, out, _ = _run(["replay"], capsys)
    assert code in (0, 2) and "find" in out  # click ≥ 8.2 exits 2 after printing help for no arguments
