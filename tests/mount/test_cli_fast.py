"""`blkfuse ctl` and `blkfuse status` start fast (issue #23): their plain forms load neither
click nor trio nor pyfuse3, and answer exactly what the click commands answer. No timing is
asserted (scripts/cli-startup measures it)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from blkfuse.cli import main

from conftest import blkfuse

# Runs the console script's entry point in a fresh interpreter, then reports what it imported.
PROBE = """
import json, sys
from blkfuse.cli import run
sys.argv = ["blkfuse"] + json.loads(sys.argv[1])
try:
    run()
except SystemExit as e:
    code = e.code
else:
    code = None
with open(REPORT, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def probe(tmp_path, args):
    report = tmp_path / "report.json"
    code = PROBE.replace("REPORT", repr(str(report)))
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(report.read_text())
    return result["code"], set(result["modules"]), r.stdout, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["ctl", "MNT", "status"],
        ["ctl", "MNT", "help"],
        ["status", "MNT"],
        ["status", "--json", "MNT"],
    ],
    ids=["ctl-status", "ctl-help", "status", "status-json"],
)
def test_plain_ctl_and_status_load_neither_trio_nor_pyfuse3_nor_click(mount, tmp_path, args):
    m = mount()
    args = [m.mnt if a == "MNT" else a for a in args]
    code, modules, out, err = probe(tmp_path, args)
    assert code == 0, err
    assert out and not err
    assert not {"trio", "pyfuse3", "click"} & modules, sorted(
        {"trio", "pyfuse3", "click"} & modules
    )
    assert not {name for name in modules if name.startswith("blkfuse.daemon")}
    # the same answer the click command gives (a status line that changes, the pid, aside)
    clicked = CliRunner().invoke(main, [str(a) for a in args])
    assert clicked.exit_code == 0, clicked.output
    if args[0] == "status" and "--json" in args:
        assert json.loads(out)["info"] == json.loads(clicked.output)["info"]
    else:
        assert out.splitlines()[:3] == clicked.output.splitlines()[:3]


def test_a_failing_ctl_on_the_fast_path_fails_as_before_and_loads_nothing_more(mount, tmp_path):
    m = mount()
    code, modules, out, err = probe(tmp_path, ["ctl", m.mnt, "break", "nope", "A"])
    assert code == 1 and out == ""
    assert err == 'blkfuse: line 1: unknown event "nope" (did you mean "none"?) [ENOENT]\n'
    assert not {"trio", "pyfuse3", "click"} & modules
    code, modules, out, err = probe(tmp_path, ["status", tmp_path])
    assert code == 1 and err == f"blkfuse: {tmp_path}: not a blkfuse mount (no control file)\n"
    assert not {"trio", "pyfuse3", "click"} & modules


@pytest.mark.parametrize(
    "args",
    [["ctl", "--help"], ["status", "--help"], ["ctl", "MNT"], ["status"], ["status", "MNT", "-x"]],
)
def test_anything_but_the_plain_forms_goes_to_click(tmp_path, args):
    args = [tmp_path if a == "MNT" else a for a in args]
    code, modules, out, err = probe(tmp_path, args)
    assert "click" in modules
    assert not {"trio", "pyfuse3"} & modules  # click's path for these loads no daemon either
    r = blkfuse(*args)
    assert (code or 0) == r.returncode
    assert (out, err) == (r.stdout, r.stderr)
    if "--help" in args:
        assert code == 0 and out.startswith(f"Usage: blkfuse {args[0]} [OPTIONS] MOUNTPOINT")
    elif args[0] == "ctl":  # a mountpoint and no command: ctl's own message names it
        assert code == 1 and out == "" and "no command for" in err
    else:
        assert code == 2 and out == "" and "Error:" in err
