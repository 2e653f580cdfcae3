"""scripts/e2e-crash: `blkfuse crashtest` finds real crash bugs and passes correct programs.
Each test runs some of the script's proofs and reads its --json result."""

import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "e2e-crash"


def proofs(tmp_path, *names, extra=()):
    out = tmp_path / "e2e-crash.json"
    args = [str(SCRIPT), "--json", str(out), *extra]
    for name in names:
        args += ["--only", name]
    r = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert out.exists(), r.stdout + r.stderr
    result = json.loads(out.read_text())
    by_name = {p["name"]: p for p in result["proofs"]}
    assert list(by_name) == list(names)
    assert r.returncode == (0 if result["ok"] else 1)
    return by_name


def test_sqlite_wal_full_passes_every_state_of_100_commits(tmp_path):
    (p,) = proofs(tmp_path, "sqlite-full", extra=["--commits", "100", "--states", "1"]).values()
    report = p["report"]
    assert p["ok"], p["detail"]
    assert report["failures"] == [] and report["failed"] == 0
    assert report["states"] == report["passed"] == report["planned"]
    # a point at each of the 100 acknowledgements at least, and each commit's flushes
    assert report["crash_points"] > 200
    assert report["states"] > report["crash_points"] // 2


@pytest.mark.parametrize("name", ["sqlite-off", "sqlite-barrier0"])
def test_sqlite_negative_controls_are_found(tmp_path, name):
    (p,) = proofs(tmp_path, name, extra=["--commits", "20"]).values()
    assert p["ok"], p["detail"]
    first = p["report"]["failures"][0]
    assert first["kind"] == "check"
    assert "acknowledged commits missing" in first["output"]


def test_rename_without_fsync_is_found_and_with_fsync_passes(tmp_path):
    found, correct = proofs(tmp_path, "rename-nofsync", "rename-fsync").values()
    assert found["ok"], found["detail"]
    output = found["report"]["failures"][0]["output"]
    # the empty file of ext4's delayed allocation: the rename committed, the data not
    assert "config is empty after version" in output, output
    assert correct["ok"], correct["detail"]
    assert correct["report"]["failed"] == 0
    assert correct["report"]["states"] == correct["report"]["planned"] > 10


def test_ack_before_fsync_is_found_and_replays_to_the_same_image(tmp_path):
    found, correct = proofs(tmp_path, "ack-before-fsync", "fsync-before-ack").values()
    assert found["ok"], found["detail"]
    first = found["report"]["failures"][0]
    assert "is lost or torn after" in first["output"]
    first_hash, second_hash = found["report"]["replay_sha256"]
    assert first_hash == second_hash
    assert correct["ok"], correct["detail"]
    assert correct["report"]["failed"] == 0
