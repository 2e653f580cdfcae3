"""Breakpoint and aio scenarios asked of qemu-io live, then replayed on blkfuse's targets.

The recorded cases (test_oracle_cases.py) hold few breakpoint interleavings; these add the
ones oracle/README.md describes (facts 13 and 16, state changes and flushes while a request
is suspended). Each scenario runs through the installed qemu-io; its per-command answers and
final image become a case in the recorded format, replayed with tests/oracle.py on the block
layer and on a real mount.

Reading qemu-io's answers: commands are separated by `help sleep` markers (see
tests/differential.py); an aio request's completion message ("aio_write failed: ...",
"wrote ...", "read ...", "Pattern verification failed ...") is printed during a later command
and belongs to the oldest aio request still outstanding (scenarios keep at most one
outstanding, and no other command in flight uses its offset and length, so there is no
ambiguity); `flush` runs as `reopen`, which prints its error. Not here: a flush while a
request is suspended (qemu-io's reopen drains, so it would wait for the suspended request
forever, and a plain `flush` prints nothing).
"""

import re
import shutil
import subprocess

import pytest

import differential as D
import oracle

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(D.QEMU_IO is None, reason="qemu-io is not installed"),
]

SCENARIOS = {
    # oracle/README.md fact 13: the active set is global; an error armed by a suspended
    # read is consumed by an unrelated write issued meanwhile.
    "armed_by_suspended_read_hits_other_write": (
        '[inject-error]\nevent = "read_aio"\nonce = "on"\nerrno = "28"\n',
        [
            "break read_aio A",
            "aio_read -P 0 0 512",
            "wait_break A",
            "write -P 0x11 4096 512",
            "resume A",
            "aio_flush",
            "read -P 0x11 4096 512",
            "read -P 0 0 512",
        ],
    ),
    # fact 16: two breakpoints on one event; goes on after both resumes, in any order.
    "two_breakpoints_one_event": (
        "",
        [
            "break write_aio A",
            "break write_aio B",
            "aio_write -P 0x22 0 512",
            "wait_break A",
            "wait_break B",
            "resume B",
            "resume A",
            "aio_flush",
            "read -P 0x22 0 512",
        ],
    ),
    # A rule armed by write_aio of a write suspended at pwritev fails a read meanwhile;
    # the write then goes through.
    "suspended_at_pwritev_rule_consumed_by_read": (
        '[inject-error]\nevent = "write_aio"\nonce = "on"\n',
        [
            "break pwritev A",
            "aio_write -P 0x33 0 512",
            "wait_break A",
            "read 0 512",
            "resume A",
            "aio_flush",
            "read -P 0x33 0 512",
        ],
    ),
    # The state moves on while a write is suspended; rules see the state at event time.
    "state_changes_while_suspended": (
        '[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n'
        '[inject-error]\nevent = "write_aio"\nstate = "2"\nerrno = "30"\n',
        [
            "break write_aio A",
            "aio_write -P 0x44 0 512",
            "wait_break A",
            "read 0 512",
            "resume A",
            "aio_flush",
            "write -P 0x55 512 512",
            "read -P 0x44 0 512",
        ],
    ),
    # A breakpoint on pwritev_done: the write's data is already in the image.
    "suspended_after_the_write": (
        "",
        [
            "break pwritev_done A",
            "aio_write -P 0x77 0 512",
            "wait_break A",
            "read -P 0x77 0 512",
            "resume A",
            "aio_flush",
        ],
    ),
    # resume/remove_break of unknown tags, break on a qcow2-only event (never fires).
    "unknown_tags_and_unreached_event": (
        "",
        [
            "resume X",
            "remove_break X",
            "break l2_load A",
            "write 0 512",
            "remove_break A",
            "read 0 512",
        ],
    ),
    # remove_break of a tag a request is suspended at: QEMU 7.2 wakes the request, then
    # reports ENOENT; blkfuse reports success (docs/design.md, "Deliberate differences").
    "remove_break_wakes_suspended": (
        "",
        [
            "break write_aio A",
            "aio_write -P 0x12 0 512",
            "wait_break A",
            "remove_break A",
            "aio_flush",
            "read -P 0x12 0 512",
        ],
    ),
}

# name -> {op index: (QEMU's answer, blkfuse's documented answer)}
DELIBERATE = {"remove_break_wakes_suspended": {3: ("ENOENT", "ok")}}


def _ask_qemu(config: str, ops: list[str], image_size: int, tmp_path) -> tuple[list, bytes]:
    conf = tmp_path / "live.conf"
    img = tmp_path / "live.raw"
    conf.write_text(config)
    img.write_bytes(bytes(image_size))
    argv = [
        D.STDBUF,
        "-o0",
        "-e0",
        D.QEMU_IO,
        "-t",
        "writeback",
        "-f",
        "raw",
        f"blkdebug:{conf}:{img}",
    ]
    for op in ops:
        argv += ["-c", "reopen" if op == "flush" else op, "-c", D.MARKER_CMD]
    out = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
    ).stdout
    segments, current = [], []
    for line in out.splitlines():
        if line == D.MARKER_LINE:
            segments.append(current)
            current = []
        elif line.strip():
            current.append(line)
    assert len(segments) == len(ops), out
    outcomes = [None] * len(ops)
    aio = None  # (index, offset, length) outstanding
    for i, (op, lines) in enumerate(zip(ops, segments)):
        cmd = op.split()[0]
        outcome = "ok"
        for line in lines:
            if line.startswith("blkdebug: ") or re.match(r"^\d+ bytes, \d+ ops;", line):
                continue
            m = re.match(r"^(aio_read|aio_write) failed: (.*)$", line)
            if m:
                assert aio is not None, out
                outcomes[aio[0]] = oracle.errname(D.errno_of(m.group(2)))
                aio = None
                continue
            m = re.match(r"^(?:read|wrote) (\d+)/\d+ bytes at offset (\d+)$", line)
            if m and aio is not None and (int(m.group(2)), int(m.group(1))) == aio[1:]:
                outcomes[aio[0]] = outcomes[aio[0]] or "ok"
                aio = None
                continue
            if m:
                continue  # the command's own success line
            m = re.match(r"^Pattern verification failed at offset (\d+), (\d+) bytes$", line)
            if m and aio is not None and (int(m.group(1)), int(m.group(2))) == aio[1:]:
                outcomes[aio[0]] = "MISCOMPARE"
                continue
            if m:
                outcome = "MISCOMPARE"
                continue
            m = re.search(
                r"^(?:read failed|write failed|Could not .*|.*Error flushing drive): "
                r"(.*)$",
                line,
            )
            if m:
                outcome = oracle.errname(D.errno_of(m.group(1)))
                continue
            raise AssertionError(f"unexpected qemu-io output for {op!r}: {line!r}\n{out}")
        if cmd in ("aio_read", "aio_write"):
            assert aio is None, "scenarios keep one aio request outstanding"
            parsed = oracle.parse_op(op)
            aio = (i, parsed.offset, parsed.length)
            continue
        outcomes[i] = outcome
    assert aio is None, out
    return outcomes, img.read_bytes()


@pytest.mark.parametrize("target", ["block", "mount"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_live_scenario(name, target, tmp_path):
    if D.STDBUF is None:
        pytest.skip("stdbuf (coreutils) is needed to read qemu-io's output in order")
    if target == "mount":
        why_not = oracle.mount_available()
        if why_not:
            pytest.skip(why_not)
    config, ops = SCENARIOS[name]
    size = 65536
    qdir = tmp_path / "qemu"
    qdir.mkdir()
    expect, image = _ask_qemu(config, ops, size, qdir)
    for i, (qemu_says, we_say) in DELIBERATE.get(name, {}).items():
        assert expect[i] == qemu_says, f"QEMU no longer answers {qemu_says} at op {i}: {expect}"
        expect[i] = we_say
    case = {
        "name": name,
        "config": config,
        "image_size": size,
        "ops": ops,
        "expect": expect,
        "final_image": oracle.runs_of(image),
        "qemu": D.installed_profile(),  # the answers are the installed qemu-io's
    }
    exp = oracle.expectation(case, target)
    bdir = tmp_path / target
    bdir.mkdir()
    replay = oracle.replay_block if target == "block" else oracle.replay_mount
    got = replay(case, bdir)
    problems = oracle.compare(case, exp, got)
    assert not problems, (
        f"{name} ({target}) disagrees with live qemu-io:\n  "
        + "\n  ".join(problems)
        + f"\n  ops: {ops}\n  qemu-io: {expect}"
        f"\n  blkfuse: {got.outcomes}"
    )


def test_stdbuf_present_for_exact_parsing():
    assert shutil.which("stdbuf"), "coreutils' stdbuf is needed"
