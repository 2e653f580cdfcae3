"""The lean path (BlockDevice.read_now/write_now, Engine.unseen; README "Benchmarks") changes
nothing anyone can see: the same answers, data, event counts, rule hits, injected errors and
flush generations as the full path, request for request, whatever the rules."""

import errno
import os
from unittest import mock

import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from support.device import build_device

from blkfuse.block import device
from blkfuse.rules.config import parse_config_text

KiB = 1024
SIZE = 64 * KiB
SECTORS = SIZE // 512

EVENTS = ["none", "read_aio", "write_aio", "pwritev", "pwritev_done", "flush_to_disk"]


@st.composite
def configs(draw):
    """Plain blkdebug rules (QEMU's keys only): errors anywhere or at a sector, once or not,
    errno 0 too, in states the set-state rules move between."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        lines = ["[inject-error]", f'event = "{draw(st.sampled_from(EVENTS))}"']
        lines.append(f'errno = "{draw(st.sampled_from([0, 5, 28]))}"')
        if draw(st.booleans()):
            lines.append(f'sector = "{draw(st.integers(0, SECTORS - 1))}"')
        if draw(st.booleans()):
            lines.append(f'iotype = "{draw(st.sampled_from(["read", "write", "flush"]))}"')
        if draw(st.booleans()):
            lines.append('once = "on"')
        if draw(st.booleans()):
            lines.append(f'state = "{draw(st.integers(1, 2))}"')
        parts.append("\n".join(lines))
    for _ in range(draw(st.integers(0, 2))):
        parts.append(
            f'[set-state]\nevent = "{draw(st.sampled_from(EVENTS))}"\n'
            f'state = "{draw(st.integers(1, 2))}"\nnew_state = "{draw(st.integers(1, 2))}"'
        )
    return "\n\n".join(parts) + "\n"


ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "flush"]),
        st.integers(0, SIZE - 1),
        st.sampled_from([1, 512, 4096, 9000]),
    ),
    max_size=25,
)


async def read_later(dev, offset, length):
    """dev.read_later as the nowait handler uses it: None (full path), or its data, now or
    from the ring's reaper (an OSError then raised here, as the reply would carry it)."""
    done = trio.Event()
    got = []

    def answer(data):
        got.append(data)
        done.set()

    started = dev.read_later(offset, length, answer)
    if started is False:
        return None
    if started is not True:
        return started
    await done.wait()
    if isinstance(got[0], OSError):
        raise got[0]
    return got[0]


def replay(path, config, requests, lean, **options):
    """Run `requests` on a fresh device over `path`; what anyone could see afterwards.
    `lean`: "now" offers reads to read_now (the nowait handler's), "mapped" too but with
    every read large enough to be answered from a mapping, "await" to read_unseen
    (the async handler's, when the image must wait), "later" to read_later (the nowait
    handler's after a page-cache miss: io_uring where the image has one, answered through
    the callback), each then the full path; writes go to write_now first either way.
    False: the lean path is off."""
    if lean == "mapped":
        with mock.patch.object(device, "MAPPED_READ_MIN", 1):
            seen, lean_used = replay(path, config, requests, "now", **options)
        return seen, lean_used
    dev = build_device(path, rules=parse_config_text(config, "t.conf"), seed=1, **options)
    if not lean:
        dev.lean_off()
    answers, lean_used = [], 0

    async def main():
        nonlocal lean_used
        for op, offset, length in requests:
            try:
                if op == "read":
                    if lean == "await":
                        data = await dev.read_unseen(offset, length)
                    elif lean == "later":
                        data = await read_later(dev, offset, length)
                    else:
                        data = dev.read_now(offset, length)
                    if data is None:
                        data = await dev.read(offset, length)
                    else:
                        lean_used += 1
                    answers.append(bytes(data))
                elif op == "write":
                    buf = bytes([offset % 251]) * min(length, SIZE - offset)
                    n = dev.write_now(offset, buf)
                    if n is None:
                        n = await dev.write(offset, buf)
                    else:
                        lean_used += 1
                    answers.append(n)
                else:
                    await dev.flush()
                    answers.append("flushed")
            except OSError as e:
                answers.append(e.errno)

    trio.run(main)
    engine = dev.engine
    seen = {
        "answers": answers,
        "events": dict(engine.event_counts),
        "state": engine.state,
        "rules": [(r.id, r.hits, r.spent) for r in engine.rules()],
        "errors": dict(engine.errors_injected),
        "generations": (dev._format_written, dev._blkdebug_written),
        "image": path.read_bytes(),
    }
    dev.stack.close()
    return seen, lean_used


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(config=configs(), requests=ops, inline=st.booleans())
def test_lean_and_full_paths_leave_the_same_trace(tmp_path, config, requests, inline):
    options = {"io_threads": 0} if inline else {}  # inline image I/O, or NOWAIT on a disk
    results = {}
    for lean in ("now", "mapped", "await", "later", False):
        path = tmp_path / f"img-{lean}.raw"
        path.write_bytes(bytes(range(256)) * (SIZE // 256))
        results[lean] = replay(path, config, requests, lean, **options)[0]
    assert results["now"] == results[False]
    assert results["mapped"] == results[False]
    assert results["await"] == results[False]
    assert results["later"] == results[False]


def test_the_lean_path_is_taken_when_nothing_can_see_the_request(tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(SIZE))
    far = '[inject-error]\nevent = "none"\nerrno = "5"\nsector = "120"\n'  # byte 61440
    requests = [("read", 0, 4096), ("write", 4096, 4096), ("read", 61440, 512)]
    seen, lean_used = replay(path, far, requests, "now", io_threads=0)
    assert lean_used == 2  # the read of the rule's sector took the full path, and failed
    assert seen["answers"] == [bytes(4096), 4096, errno.EIO]
    assert seen["events"]["read_aio"] == 2 and seen["events"]["pwritev_done"] == 1
    assert seen["rules"] == [(1, 1, False)]  # it met one request, and stays armed


def test_anything_that_could_see_a_request_turns_the_lean_path_off(tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(SIZE))

    async def main():
        dev = build_device(path, io_threads=0)
        assert dev.read_now(0, 512) is not None and dev.write_now(0, b"x") == 1
        dev.engine.add_breakpoint("flush_to_os", "A")  # any breakpoint
        assert dev.read_now(0, 512) is None and dev.write_now(0, b"x") is None
        dev.engine.remove_breakpoint("A")
        rule_id = dev.engine.add_rule(
            parse_config_text('[inject-error]\nevent = "read_aio"\n', "t")[0]
        )
        assert dev.read_now(0, 512) is None  # a rule on its event
        assert dev.write_now(0, b"x") == 1
        dev.engine.remove_rule(rule_id)
        assert dev.read_now(0, 512) is not None  # gone: lean again
        dev.engine.add_rule(parse_config_text('[inject-error]\nevent = "read_aio"\n', "t")[0])
        assert dev.read_now(0, 512) is None
        dev.lean_off()  # what a recording filter does
        assert dev.read_now(0, 512) is None and dev.write_now(0, b"x") is None
        dev.lean_on()
        assert dev.write_now(0, b"x") == 1
        dev.stack.close()
        # the undo log (a filter that sees every change): reads stay lean, writes do not
        undo = build_device(path, io_threads=0, track_unsynced=True)
        assert undo.read_now(0, 512) is not None and undo.write_now(0, b"x") is None
        undo.stack.close()
        # padding or splitting: the full path
        for options in ({"align": 4096}, {"max_transfer": 4096}, {"format": "none"}):
            other = build_device(path, io_threads=0, **options)
            assert other.read_now(0, 512) is None and other.write_now(0, b"x") is None
            other.stack.close()

    trio.run(main)


def test_the_size_is_kept_and_a_resize_from_outside_shows_at_the_next_stat(tmp_path):
    path = tmp_path / "img.raw"
    path.write_bytes(bytes(SIZE))
    dev = build_device(path, io_threads=0)
    assert dev.size() == SIZE
    os.truncate(path, 2 * SIZE)
    assert dev.size() == SIZE  # as QEMU keeps a regular file's length
    assert dev.size(live=True) == 2 * SIZE  # what the mount's stat asks
    assert dev.read_now(SIZE, 4096) == bytes(4096)
    dev.stack.close()


def test_lean_requests_through_a_mount_count_every_event(mount):
    m = mount()
    fd = os.open(m.file, os.O_RDWR)
    try:
        for i in range(20):
            os.pwrite(fd, b"y" * 4096, i * 4096)
            assert os.pread(fd, 4096, i * 4096) == b"y" * 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    events = m.status()["events"]
    assert events["read_aio"] == 20
    assert events["write_aio"] == events["pwritev"] == events["pwritev_done"] == 20
    assert events["flush_to_disk"] == 1  # the lean writes counted as written since the flush


def _mappings_of(path) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(str(path)))


RULE_AT_SECTOR_1000 = '[inject-error]\nevent = "none"\nerrno = "5"\nsector = "1000"\n'


def test_a_large_read_is_a_view_of_the_file_mapped_for_it(tmp_path):
    path = tmp_path / "img.raw"
    content = os.urandom(1024 * KiB + 1000)  # the end is not on a page boundary
    path.write_bytes(content)
    dev = build_device(path, io_threads=0)
    image = dev.stack.image
    large = device.MAPPED_READ_MIN
    data = dev.read_now(4096, large)
    assert type(data) is memoryview and data == content[4096 : 4096 + large]
    assert _mappings_of(path) == 1
    del data  # the reply is sent: the mapping goes with the view
    assert _mappings_of(path) == 0
    tail = len(content) - large
    assert dev.read_now(tail, large + 4096) == content[tail:]  # cut at the end, as a pread
    assert type(dev.read_now(0, large - 512)) is bytes  # smaller: copied
    assert image.read_counts()["mapped"] == 2
    assert dev.engine.event_counts["read_aio"] == 3  # counted as every lean read
    # a rule that sees the request: the full path reads it (and fails it)
    dev.engine.add_rule(parse_config_text(RULE_AT_SECTOR_1000, "t")[0])
    assert dev.read_now(0, large) == content[:large]  # sector 1000 is past it: lean
    assert dev.read_now(1000 * 512 - 4096, large) is None
    # the file shrank behind the size the device keeps: read as a pread would, short
    os.truncate(path, 600 * KiB)
    assert dev.read_now(512 * KiB - 4096, large) == content[512 * KiB - 4096 : 600 * KiB]
    assert image.read_counts()["mapped"] == 3
    assert _mappings_of(path) == 0
    dev.stack.close()
