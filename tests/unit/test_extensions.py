"""blkfuse's keys beyond blkdebug (README "Beyond blkdebug"): parsing, engine, block layer,
control and `blkfuse check`, without FUSE. The mount tests are in test_mount_extensions.py;
the naive-model property tests in test_engine_properties.py."""

import errno
import os

import pytest
import trio
from support.device import build_device

from blkfuse.daemon.callers import Caller
from blkfuse.daemon.control import Control, ControlError
from blkfuse.engine.core import Engine
from blkfuse.engine.effects import Effect
from blkfuse.rules import config
from blkfuse.rules.config import ConfigError, format_rule, parse_config_text, parse_rule_args

from conftest import blkfuse


def rule(*words, source="control"):
    return parse_rule_args("inject-error", list(words), source)


def engine(*rules, seed=1):
    return Engine(list(rules), seed=seed)


def bad(*words) -> str:
    with pytest.raises(ConfigError) as info:
        rule(*words)
    return str(info.value)


# ---- parsing ------------------------------------------------------------------------------


def test_every_key_parses_and_formats_back():
    r = rule(
        "event=none",
        "sector=8",
        "sectors=16",
        "probability=0.25",
        "after=2",
        "count=3",
        "delay=1.5s",
        "jitter=200us",
        "corrupt=random",
        "corrupt-bytes=4",
        "pid=77",
        "comm=my prog",
        "uid=1000",
        "heal=on",
        "persistent=on",
    )
    ext = r.ext
    assert (ext.probability, ext.after, ext.count, ext.sectors) == (0.25, 2, 3, 16)
    assert (ext.delay_us, ext.jitter_us) == (1_500_000, 200)
    assert (ext.corrupt, ext.corrupt_bytes, ext.pid, ext.comm, ext.uid) == (
        "random",
        4,
        77,
        "my prog",
        1000,
    )
    assert ext.heal and ext.persistent
    assert r.errno == 0  # delay or corrupt without errno: no failure
    line = format_rule(r)
    assert 'comm="my prog"' in line and "delay=1500ms" in line
    import shlex

    again = parse_rule_args("inject-error", shlex.split(line)[1:])
    assert format_rule(again) == line
    # and through a config file
    [from_file] = parse_config_text(config.format_config([r]), "x.conf")
    assert format_rule(from_file) == line


def test_qemu_rules_carry_no_extensions():
    assert rule("event=read_aio", "errno=5", "sector=3", "once=on").ext is None
    assert rule("event=read_aio").errno == errno.EIO  # QEMU's default stays


def test_errno_defaults():
    assert rule("event=none", "delay=10ms").errno == 0
    assert rule("event=none", "jitter=10ms").errno == 0
    assert rule("event=none", "corrupt=flip").errno == 0
    assert rule("event=none", "delay=10ms", "errno=28").errno == 28  # held, then fails
    assert rule("event=none", "probability=0.5").errno == errno.EIO  # neither: EIO
    assert rule("event=none", "corrupt=zero", "errno=0").errno == 0


@pytest.mark.parametrize(
    "words, message",
    [
        (["probability=0"], "above 0 and at most 1"),
        (["probability=1.5"], "above 0 and at most 1"),
        (["probability=nan"], "above 0 and at most 1"),
        (["count=0"], "count must be at least 1"),
        (["after=-1"], "after must be at least 0"),
        (["sectors=4"], "sectors needs sector"),
        (["sector=1", "sectors=0"], "sectors must be at least 1"),
        (["delay=10"], "with a unit"),
        (["delay=10 parsecs"], "with a unit"),
        (["delay=0.1ns"], "shorter than the 1us"),
        (["delay=25h"], "too long"),
        (["delay=30m1h"], "largest first"),
        (["delay=1h 30"], "with a unit"),
        (["delay=90000s"], "too long"),
        (["corrupt=flop"], 'did you mean "flip"'),
        (["corrupt=flip", "errno=5"], "errno must be 0 or absent"),
        (["corrupt-bytes=2"], "corrupt-bytes needs corrupt"),
        (["heal=on"], "heal needs sector"),
        (["once=on", "count=2"], "once and count"),
        (["comm=a-very-long-command-name"], "first 15 bytes"),
        (["pid=-3"], "pid expects"),
        (["uid=x"], "uid expects"),
        (["persistent=1"], "on or off"),
        (["probabilty=0.5"], 'did you mean "probability"'),
    ],
)
def test_bad_extension_values_are_named(words, message):
    assert message in bad("event=none", *words)


def test_option_and_file_spellings(tmp_path):
    rules, settings = config.parse_options(
        {
            "inject-error.0.event": "none",
            "inject-error.0.sector": "8",
            "inject-error.0.sectors": "8",
            "inject-error.0.delay": "2ms",
            "seed": "42",
        }
    )
    assert rules[0].ext.sectors == 8 and rules[0].ext.delay_us == 2000
    assert settings.seed == 42
    with pytest.raises(ConfigError, match="option seed"):
        config.parse_options({"seed": "-1"})
    with pytest.raises(ConfigError, match="conf:4.*above 0"):
        parse_config_text('[inject-error]\nevent = "none"\n\nprobability = "2"\n', "x.conf")


def test_extension_list_is_one_place():
    assert set(config.SECTION_KEYS["inject-error"]) == set(config.QEMU_KEYS["inject-error"]) | set(
        config.EXTENSION_KEYS["inject-error"]
    )
    assert not set(config.QEMU_KEYS["inject-error"]) & set(config.EXTENSION_KEYS["inject-error"])


# ---- engine -------------------------------------------------------------------------------


def decisions(e, n=200):
    return [e.check("read", 0, 512) for _ in range(n)]


def test_probability_is_seeded_and_replays():
    r = "event=none", "probability=0.3"
    first = decisions(engine(rule(*r), seed=7))
    assert decisions(engine(rule(*r), seed=7)) == first
    assert decisions(engine(rule(*r), seed=8)) != first
    assert 0 < first.count(errno.EIO) < 200
    assert Engine([]).seed != Engine([]).seed or True  # random by default (shown in status)


def test_reload_replays_the_same_decisions():
    e = engine(rule("event=none", "probability=0.5"), seed=3)
    first = decisions(e, 50)
    e.replace_rules([rule("event=none", "probability=0.5")])
    assert decisions(e, 50) == first


def test_after_and_count_are_exact():
    e = engine(rule("event=none", "after=2", "count=3"))
    assert decisions(e, 8) == [0, 0, errno.EIO, errno.EIO, errno.EIO, 0, 0, 0]
    assert [r.spent for r in e.rules()] == [True]  # used up: listed, never again


def test_once_keeps_qemu_meaning_with_extensions():
    e = engine(rule("event=none", "after=1", "once=on", "errno=28"))
    assert decisions(e, 3) == [0, 28, 0]


def test_a_rule_that_does_not_act_lets_the_next_decide():
    e = engine(rule("event=none", "after=1", "errno=28"), rule("event=none", "errno=5"))
    assert decisions(e, 3) == [5, 28, 28]


def test_sector_range_overlap_and_qemu_single_byte():
    e = engine(rule("event=none", "sector=8", "sectors=4"))  # bytes [4096, 6144)
    assert e.check("read", 4096 + 2047, 1) == errno.EIO  # last byte
    assert e.check("read", 6144, 512) == 0
    assert e.check("read", 3584, 512) == 0
    assert e.check("read", 3584, 513) == errno.EIO
    assert e.check("flush", 0, 0) == 0  # a flush covers no sector
    qemu = engine(rule("event=none", "sector=8", "probability=1"))
    assert qemu.check("read", 4097, 100) == 0  # QEMU: the one byte 4096


def test_range_rules_keep_priority_across_index_buckets():
    e = engine(
        rule("event=none", "sector=0", "sectors=100000", "errno=1"),
        rule("event=none", "sector=50", "errno=2"),
        rule("event=none", "sector=40", "sectors=20", "errno=3"),
    )
    assert e.check("read", 50 * 512, 512) == 1
    e.remove_rule(1)
    assert e.check("read", 50 * 512, 512) == 2
    assert e.check("read", 45 * 512, 512) == 3


def test_delay_and_corrupt_answer_an_effect():
    e = engine(rule("event=none", "delay=10ms", "errno=5"))
    outcome = e.check("write", 0, 512)
    assert isinstance(outcome, Effect) and outcome.errno == 5 and outcome.delay == 0.01
    e = engine(rule("event=none", "corrupt=zero", "corrupt-bytes=3"))
    outcome = e.check("read", 0, 512)
    assert outcome.corrupt == "zero" and outcome.corrupt_bytes == 3 and outcome.errno == 0
    assert e.check("flush", 0, 0) == 0  # nothing to corrupt in a flush
    [r] = e.rules()
    tally = e.tally(r)
    assert (tally.failed, tally.delayed, tally.corrupted) == (0, 0, 1)


def test_jitter_is_uniform_and_seeded():
    delays = [
        engine(rule("event=none", "delay=1ms", "jitter=1ms"), seed=s).check("read", 0, 1).delay
        for s in range(50)
    ]
    assert all(0.001 <= d <= 0.002 for d in delays) and len(set(delays)) > 10


def test_caller_filters():
    me = Caller(os.getpid(), os.getuid(), os.getgid())
    other = Caller(4_000_001, 12345, 0)
    e = engine(rule("event=none", f"pid={os.getpid()}"))
    assert e.check("read", 0, 1, me) == errno.EIO
    assert e.check("read", 0, 1, other) == 0
    assert e.check("read", 0, 1, None) == 0  # unknown sender: a filter never matches
    e = engine(rule("event=none", "uid=12345"))
    assert e.check("read", 0, 1, other) == errno.EIO and e.check("read", 0, 1, me) == 0
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    e = engine(rule("event=none", f"comm={comm}"))
    assert e.check("read", 0, 1, me) == errno.EIO and e.check("read", 0, 1, other) == 0


def test_pid_filter_matches_any_thread_of_the_process():
    import threading

    tids = []
    t = threading.Thread(target=lambda: tids.append(threading.get_native_id()))
    t.start()
    t.join()
    e = engine(rule("event=none", f"pid={os.getpid()}"))
    # a live thread of this process: the main thread is alive, its tid is the pid itself;
    # another thread's tid maps back to the process through /proc/TID/status
    assert e.check("read", 0, 1, Caller(threading.get_native_id(), 0, 0)) == errno.EIO


def test_heal_removes_the_rule_after_a_write_over_its_span():
    e = engine(rule("event=none", "sector=8", "sectors=2", "heal=on"))
    assert e.check("read", 4096, 512) == errno.EIO
    assert e.check("write", 4096, 512) == errno.EIO  # partial write: still bad
    assert e.check("write", 4096, 1024) == 0  # covers it: goes through
    e.written(4096, 512)
    assert e.rules()  # partial: not healed
    e.written(0, 8192)
    assert [r.spent for r in e.rules()] == [True] and e.rules_healed == 1
    assert e.check("read", 4096, 512) == 0


def test_persistent_rules_survive_a_later_arming():
    e = engine(
        rule("event=none", "sector=8", "persistent=on"),
        rule("event=none", "sector=9"),
        rule("event=write_aio", "sector=100", "errno=28"),
    )
    e.fire("write_aio")
    assert e.check("read", 8 * 512, 512) == errno.EIO  # kept
    assert e.check("read", 9 * 512, 512) == 0  # QEMU: replaced
    assert e.check("read", 100 * 512, 512) == 28
    assert [r.id for r in e.active()] == [1, 3]
    e.remove_rule(1)
    assert e.check("read", 8 * 512, 512) == 0


def test_plain_rules_keep_the_fast_path():
    e = engine(rule("event=none", "sector=8"))
    assert e._plain  # decide takes QEMU's one lookup
    rid = e.add_rule(rule("event=none", "probability=0.5", "iotype=discard"))
    assert not e._plain  # the extension path while it is armed
    e.remove_rule(rid)
    assert e._plain


# ---- block layer: the data ------------------------------------------------------------------


@pytest.fixture
def device(tmp_path):
    def make(*rules, size=64 * 1024, seed=1, **options):
        path = tmp_path / "disk.img"
        path.write_bytes(bytes(range(256)) * (size // 256))
        return build_device(path, rules=rules, seed=seed, **options), path

    return make


def diff_positions(a, b):
    return [i for i in range(len(a)) if a[i] != b[i]]


def test_corrupt_read_changes_only_what_was_read(device):
    dev, path = device(
        rule("event=none", "sector=8", "sectors=2", "corrupt=flip", "corrupt-bytes=5")
    )
    image = path.read_bytes()
    data = trio.run(dev.read, 0, 16384)
    changed = diff_positions(data, image[:16384])
    assert len(changed) == 5 and all(4096 <= i < 5120 for i in changed)
    assert all(bin(data[i] ^ image[i]).count("1") == 1 for i in changed)  # one bit each
    assert path.read_bytes() == image  # image untouched
    assert trio.run(dev.read, 8192, 4096) == image[8192:12288]  # elsewhere clean


def test_corrupt_write_reaches_the_image_and_reports_success(device):
    dev, path = device(rule("event=none", "corrupt=random", "corrupt-bytes=3", "iotype=write"))
    before = path.read_bytes()
    payload = bytes(4096)
    assert trio.run(dev.write, 8192, payload) == 4096
    after = path.read_bytes()
    changed = diff_positions(after, before[:8192] + payload + before[12288:])
    assert len(changed) == 3 and all(8192 <= i < 12288 for i in changed)


def test_corrupt_write_with_align_never_touches_the_padding(device):
    dev, path = device(
        rule("event=none", "corrupt=random", "corrupt-bytes=100", "iotype=write"), align=4096
    )
    before = path.read_bytes()
    trio.run(dev.write, 1000, bytes(10))
    after = path.read_bytes()
    changed = [i for i in diff_positions(after, before) if not 1000 <= i < 1010]
    assert changed == []


def test_corruption_replays_with_the_seed(device):
    r = ("event=none", "corrupt=random", "corrupt-bytes=8")
    first = trio.run(device(rule(*r), seed=9)[0].read, 0, 4096)
    assert trio.run(device(rule(*r), seed=9)[0].read, 0, 4096) == first
    assert trio.run(device(rule(*r), seed=10)[0].read, 0, 4096) != first


def test_a_delayed_read_holds_nothing_else(device):
    """The delayed read sleeps in its own task: a read elsewhere completes meanwhile."""
    dev, _ = device(rule("event=none", "sector=0", "sectors=1", "delay=30s", "iotype=read"))
    order = []

    async def main():
        async with trio.open_nursery() as nursery:

            async def slow():
                await dev.read(0, 512)
                order.append("delayed")

            nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked()
            await dev.read(8192, 512)
            order.append("other")
            nursery.cancel_scope.cancel()  # do not wait out the 30 s

    import trio.testing

    trio.run(main)
    assert order == ["other"]


def test_delay_then_fail(device):
    dev, _ = device(rule("event=none", "delay=1ms", "errno=28", "iotype=write"))
    with pytest.raises(OSError) as info:
        trio.run(dev.write, 0, b"x" * 512)
    assert info.value.errno == 28


def test_heal_through_the_block_layer(device):
    dev, _ = device(rule("event=none", "sector=8", "sectors=8", "heal=on", "errno=5"))
    with pytest.raises(OSError):
        trio.run(dev.read, 4096, 512)
    trio.run(dev.write, 4096, bytes(4096))  # the drive remaps the sectors
    assert trio.run(dev.read, 4096, 512) == bytes(512)
    assert dev.engine.rules_healed == 1


# ---- control and check ------------------------------------------------------------------------


def run_control(control, text):
    return trio.run(control.execute, text)


def test_control_command_takes_extension_keys_and_warns():
    e = Engine([rule("event=none", "sector=8", source="x.conf")], seed=5)
    control = Control(e)
    answer = run_control(control, "inject-error event=write_aio errno=28 delay=2ms\n")
    assert "added rule 2" in answer and 'persistent = "on"' in answer
    with pytest.raises(ControlError) as info:
        run_control(control, "inject-error event=none probability=3")
    assert info.value.errno == errno.EINVAL
    assert len(e.rules()) == 2  # nothing half-applied
    status = control.status_dict()
    assert status["seed"] == 5
    [plain, ext] = status["rules"]
    assert ext["delay_us"] == 2000 and ext["extension"] and ext["failed"] == 0
    assert plain["probability"] == 1.0 and not plain["extension"]
    assert "seed: 5" in control.status_text()
    assert "failed=0 delayed=0 corrupted=0" in control.status_text()


def test_no_warning_when_persistent():
    e = Engine([rule("event=none", "sector=8", "persistent=on")])
    answer = run_control(Control(e), "inject-error event=write_aio errno=28")
    assert "warning" not in answer


def test_check_marks_extensions_and_qemu_mode_names_every_one(tmp_path):
    conf = tmp_path / "rules.conf"
    conf.write_text(
        '[inject-error]\nevent = "none"\nsector = "8"\nsectors = "4"\n'
        'errno = "ENOSPC"\n\n[inject-error]\nevent = "l1_grow.write_table"\n'
        'errno = "5"\n\n[inject-error]\nevent = "read_aio"\n'
        'errno = "5"\npersistent = "on"\n'
    )
    r = blkfuse("check", conf, "-o", "seed=3")
    assert r.returncode == 0, r.stderr
    assert "not portable: sectors, errno name ENOSPC" in r.stdout
    assert "warning: rule" in r.stdout and "persistent" in r.stdout
    r = blkfuse("check", "--qemu", conf, "-o", "seed=3")
    assert r.returncode == 1
    for where in (":4:", ":5:", ":8:", ":14:", "option seed"):
        assert where in r.stderr
    plain = tmp_path / "plain.conf"
    plain.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "3"\n')
    r = blkfuse("check", "--qemu", plain)
    assert (
        r.returncode == 0 and "not portable" not in r.stdout and "blkfuse extension" not in r.stdout
    )


def test_shutdown_ends_a_hold_early(device):
    """Holds.end_all (unmount) cuts a delay short: the held request goes on, or fails with its
    rule's errno; nothing waits out a long delay."""
    dev, _ = device(
        rule("event=none", "delay=3600s", "errno=5", "iotype=write"),
        rule("event=none", "delay=3600s", "iotype=read"),
    )
    outcomes = []

    async def main():
        async with trio.open_nursery() as nursery:

            async def write():
                try:
                    await dev.write(0, b"x" * 512)
                except OSError as e:
                    outcomes.append(("write", e.errno))

            async def read():
                outcomes.append(("read", len(await dev.read(0, 512))))

            nursery.start_soon(write)
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert len(dev.holds) == 2
            dev.holds.end_all()

    import trio.testing

    trio.run(main)
    assert sorted(outcomes) == [("read", 512), ("write", 5)]
    assert len(dev.holds) == 0


@pytest.mark.parametrize(
    "text, micros, shown",
    [
        ("24h", 24 * 3600 * 10**6, "24h"),
        ("90m", 90 * 60 * 10**6, "90m"),
        ("1h30m", 90 * 60 * 10**6, "90m"),
        ("1m30.5s", 90_500_000, "90500ms"),
        ("1s500ms", 1_500_000, "1500ms"),
        ("2 ms", 2000, "2ms"),
        ("1500ns", 2, "2us"),
    ],
)
def test_durations_take_hours_minutes_and_combinations(text, micros, shown):
    r = rule("event=none", f"delay={text}")
    assert r.ext.delay_us == micros
    assert format_rule(r) == f"inject-error event=none errno=0 delay={shown}"
    assert parse_rule_args("inject-error", format_rule(r).split()[1:]).ext.delay_us == micros
