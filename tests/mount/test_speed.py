"""The speed levers keep every answer the same: the busy-poll window, backing I/O that leaves
the event loop (page cache check, worker pool), and their options. No timing is asserted."""

import errno
import mmap
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import trio
from support.device import build_device

from blkfuse.block.image import BLIND, INLINE, MAPPED_READ_MIN, NOWAIT, POOL, Image, WorkerPool
from blkfuse.block.uring import Ring
from blkfuse.daemon import fuseloop
from blkfuse.rules.config import ConfigError, parse_option_string, parse_options
from blkfuse.rules.model import InjectError

from conftest import blkfuse

MiB = 1 << 20


# ---- the adaptive window (QEMU's adjust_polling_time) -----------------------------------------


def test_window_grows_from_4us_by_doubling_up_to_the_maximum():
    window = fuseloop.AdaptiveWindow(50)
    seen = []
    for _ in range(6):
        window.waited(45_000)  # a request came 45 us after the reply: worth polling for
        seen.append(window.ns)
    assert seen == [4000, 8000, 16000, 32000, 50000, 50000]


def test_window_drops_to_zero_after_a_long_wait_and_stays_when_it_caught_the_request():
    window = fuseloop.AdaptiveWindow(50)
    window.ns = 32000
    window.waited(20_000)  # caught inside the window: the sweet spot, no change
    assert window.ns == 32000
    window.waited(2_000_000)  # 2 ms of silence: the mount went quiet, stop spinning
    assert window.ns == 0


def test_window_zero_never_polls():
    window = fuseloop.AdaptiveWindow(0)
    window.waited(10_000)
    assert window.ns == 0


# ---- options --------------------------------------------------------------------------------


def test_speed_options_parse_and_check():
    _, settings = parse_options(parse_option_string("io-threads=8,poll-us=0"))
    assert (settings.io_threads, settings.poll_us) == (8, 0)
    _, settings = parse_options({})
    assert (settings.io_threads, settings.poll_us) == (None, None)
    for bad, message in (
        ("io-threads=257", "io-threads: expects a whole number from 0 to 256"),
        ("io-threads=many", 'not "many"'),
        ("poll-us=-1", "poll-us: expects a whole number from 0 to 100000"),
        ("poll-us=1e3", 'not "1e3"'),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_options(parse_option_string(bad))


def test_unknown_option_suggests_the_speed_option():
    with pytest.raises(ConfigError, match='did you mean "poll-us"'):
        parse_options(parse_option_string("pol-us=5"))


# ---- where the image's I/O runs ---------------------------------------------------------------


@pytest.fixture
def disk_image():
    """An image on a disk-backed file system (the root), 4 MiB of a known pattern."""
    base = Path(tempfile.mkdtemp(prefix="blkfuse-speed-", dir="/var/tmp"))
    path = base / "disk.img"
    path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    yield path
    path.unlink()
    base.rmdir()


def _drop_cache(image: Image) -> None:
    os.fsync(image.fd)
    os.posix_fadvise(image.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_memory_file_system_reads_inline():
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        f.write(b"x" * 8192)
        f.flush()
        image = Image(f.name)
        assert image.io_mode == INLINE
        assert trio.run(image.read, 4096, 10) == b"x" * 10
        assert image.pool_reads == 0


async def _read_at_once(image, offsets, length=20000) -> dict[int, bytes]:
    """`length` bytes at each offset, every read in flight at once (a trio task each)."""
    results = {}

    async def one(offset):
        results[offset] = bytes(await image.read(offset, length))

    async with trio.open_nursery() as nursery:
        for offset in offsets:
            nursery.start_soon(one, offset)
    return results


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "pool"])
def test_cold_reads_leave_the_loop_with_the_same_data(disk_image, uring):
    image = Image(str(disk_image), io_threads=2, uring=uring)
    expected = disk_image.read_bytes()
    _drop_cache(image)
    offsets = [i * 64 * 1024 + 512 for i in range(40)]

    results = trio.run(_read_at_once, image, offsets)
    for offset in offsets:
        assert results[offset] == expected[offset : offset + 20000]
    if image.io_mode != INLINE:  # /var/tmp is on a disk (not tmpfs) here
        probe = Ring.open(image.fd)  # can this machine (kernel, seccomp) use io_uring?
        if probe is not None:
            probe.close()
        if uring and probe is not None:
            assert image.uses_uring and image.uring_reads > 0 and image.pool_reads == 0
        else:
            assert not image.uses_uring and image.uring_reads == 0
            assert image.pool_reads > 0  # the cold ones went to worker threads
            assert image._pool is not None and image._pool._threads <= 2
    # now hot: answered inline, and reads at the end of the file are short, never padded
    assert bytes(trio.run(image.read, 4096, 100)) == expected[4096:4196]
    assert bytes(trio.run(image.read, 4 * MiB - 10, 100)) == expected[-10:]
    _drop_cache(image)
    assert bytes(trio.run(image.read, 4 * MiB - 10, 100)) == expected[-10:]
    image.close()


@pytest.fixture
def overlay_image():
    """A 4 MiB image on overlayfs (what a Docker container's root is), over a tmpfs."""
    base = Path(tempfile.mkdtemp(prefix="blkfuse-overlay-"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
    try:
        for d in ("lower", "upper", "work", "merged"):
            (base / d).mkdir()
        (base / "lower" / "disk.img").write_bytes(bytes(range(256)) * (4 * MiB // 256))
        options = f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(base / "merged")], check=True
        )
        try:
            yield base / "merged" / "disk.img"
        finally:
            subprocess.run(["umount", str(base / "merged")], check=True)
    finally:
        subprocess.run(["umount", str(base)], check=True)
        base.rmdir()


@pytest.mark.parametrize("uring", [True, False], ids=["io_uring", "pool"])
def test_a_file_system_without_nowait_reads_blind_off_the_loop(overlay_image, uring):
    """overlayfs refuses RWF_NOWAIT, so no read can be known to be cached: every read leaves
    the loop (io_uring where it can be used, else the pool), writes are inline."""
    image = Image(str(overlay_image), io_threads=2, uring=uring)
    assert image.io_mode == BLIND and image._write_mode == INLINE
    expected = bytearray(overlay_image.read_bytes())
    offsets = [i * 64 * 1024 + 512 for i in range(40)]

    async def main():
        results = await _read_at_once(image, offsets)
        await image.write(7, b"written")
        expected[7:14] = b"written"
        results[0] = bytes(await image.read(0, 4096))
        return results

    results = trio.run(main)
    for offset in offsets:
        assert results[offset] == expected[offset : offset + 20000]
    assert results[0] == expected[:4096]
    probe = Ring.open(image.fd)
    if probe is not None:
        probe.close()
    if uring and probe is not None:
        assert image.uses_uring and image.uring_reads == 41 and image.pool_reads == 0
    else:
        assert not image.uses_uring and image.pool_reads == 41
    image.close()
    assert overlay_image.read_bytes() == expected


@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "plain"])
def test_io_uring_reads_short_at_the_end_fail_with_the_errno_and_close(disk_image, sqpoll):
    """Both kinds of ring: with a kernel submission thread (what Ring.open takes where the
    kernel allows it) and without (where it does not)."""
    fd = os.open(disk_image, os.O_RDONLY)
    ring = Ring.open(fd)
    if ring is None:  # not usable here (kernel, seccomp, not x86-64): images use the pool
        os.close(fd)
        image = Image(str(disk_image), uring=True)
        assert not image.uses_uring
        image.close()
        return
    if ring.sqpoll != sqpoll:
        ring.close()
        try:
            ring = Ring(fd, sqpoll=sqpoll)
        except OSError:  # this kernel refuses SQPOLL: Ring.open's plain ring is the one used
            assert sqpoll
            os.close(fd)
            return
    expected = disk_image.read_bytes()

    async def main():
        assert bytes(await ring.read(100, 5000)) == expected[100:5100]
        assert bytes(await ring.read(4 * MiB - 10, 100)) == expected[-10:]  # short at the end
        assert bytes(await ring.read(4 * MiB + 4096, 100)) == b""  # past the end
        parallel = {}

        async def one(offset):
            parallel[offset] = bytes(await ring.read(offset, 4096))

        async with trio.open_nursery() as nursery:
            for offset in range(0, 4 * MiB, 64 * 1024):
                nursery.start_soon(one, offset)
        for offset, data in parallel.items():
            assert data == expected[offset : offset + 4096]
        assert ring.busy == 0

    trio.run(main)
    trio.run(main)  # a second trio run gets its own reaper
    directory = os.open(disk_image.parent, os.O_RDONLY)
    bad = Ring(directory, sqpoll=sqpoll)
    with pytest.raises(OSError) as failure:
        trio.run(bad.read, 0, 10)
    assert failure.value.errno == errno.EISDIR
    bad.close()
    os.close(directory)
    fds = (ring.ring_fd, ring.eventfd)
    ring.close()
    ring.close()  # twice is fine
    for closed in fds:
        with pytest.raises(OSError):
            os.fstat(closed)
    os.close(fd)


def test_read_later_answers_now_or_through_the_callback(disk_image):
    """Image.read_later (the lean path after a page-cache miss, fs.read_nowait): with a ring,
    a miss starts the read and the data (or the OSError) comes to the callback from the
    reaper task; with nothing else waiting (loop idle) it reads at once; a hit found by
    cachestat while reads mostly miss is read at once too. Without a ring it is never offered."""
    image = Image(str(disk_image), io_threads=2, uring=True)
    expected = disk_image.read_bytes()
    try:
        if not image.uses_uring:  # no io_uring here: fs.read_nowait never gets this far
            assert not image.can_read_later()
            return
        _drop_cache(image)
        answers = {}

        async def main():
            done = trio.Event()

            def answer(offset):
                def got(data):
                    answers[offset] = data
                    if len(answers) == 64:
                        done.set()

                return got

            for offset in range(0, 4 * MiB, 64 * 1024):
                assert image.can_read_later()
                started = image.read_later(offset, 4096, answer(offset))
                assert started is True  # a miss, and the loop is not known to be idle
            await done.wait()
            # Short at the end of the file: the callback gets what is there.
            late = trio.Event()
            image.read_later(
                4 * MiB - 100, 4096, lambda data: (answers.update(end=data), late.set())
            )
            await late.wait()
            # Idle: read at once, in the loop.
            _drop_cache(image)
            image.loop_idle = lambda: True
            assert bytes(image.read_later(8192, 512, None)) == expected[8192:8704]
            # Reads mostly missed, so read_later asks cachestat first: a page in the cache
            # is read at once (where cachestat(2) exists), even with requests waiting.
            if image._cachestat is not None:
                image.loop_idle = lambda: False
                image.pread(0, 4096)
                assert bytes(image.read_later(0, 4096, None)) == expected[:4096]

        trio.run(main)
        for offset in range(0, 4 * MiB, 64 * 1024):
            assert bytes(answers[offset]) == expected[offset : offset + 4096]
        assert bytes(answers["end"]) == expected[-100:]
        assert image.uring_reads == 65 and image.blocking_inline == 1
    finally:
        image.close()


def test_a_miss_with_nothing_else_waiting_is_read_in_read_now(disk_image):
    """Queue depth 1 while reads mostly miss: BlockDevice.read_now reads it in the loop (as
    read_later would, without its cachestat and PendingReply); with a request waiting it
    leaves the read to read_later, and while reads mostly hit it never blocks."""
    dev = build_device(disk_image, io_threads=2)
    image = dev.stack.image
    expected = disk_image.read_bytes()
    try:
        if image.io_mode != NOWAIT:  # /var/tmp is on a disk here; elsewhere nothing to test
            return
        image.loop_idle = lambda: True
        _drop_cache(image)
        assert dev.read_now(0, 4096) is None  # reads were hitting: NOWAIT, which missed
        image._miss_share = 1.0  # as after a run of misses (read_later counts them)
        assert dev.read_now(8192, 4096) == expected[8192 : 8192 + 4096]
        assert image.blocking_inline == 1
        image.loop_idle = lambda: False  # another request waits: not here
        assert dev.read_now(65536, 4096) is None
        assert image.blocking_inline == 1
        assert dev.engine.event_counts["read_aio"] == 1  # only the one read_now answered
        if image.uses_uring:

            async def main():
                done = trio.Event()
                assert image.read_later(MiB, 4096, lambda data: done.set()) is True
                image.loop_idle = lambda: True  # /dev/fuse is empty, but a read is in flight
                assert dev.read_now(2 * MiB, 4096) is None
                await done.wait()

            trio.run(main)
            assert image.blocking_inline == 1
    finally:
        dev.stack.close()


def test_a_failed_read_later_reaches_the_callback_as_oserror(tmp_path):
    """A read the kernel fails (EISDIR: the fd is a directory) comes to the callback as
    OSError with its errno, from the reaper; the ring goes on."""
    directory = os.open(tmp_path, os.O_RDONLY)
    ring = Ring.open(directory)
    if ring is None:
        os.close(directory)
        pytest.skip("io_uring cannot be used here")
    got = []

    async def main():
        done = trio.Event()

        def answer(result):
            got.append(result)
            done.set()

        ring.start(0, 10, answer)
        await done.wait()

    try:
        trio.run(main)
    finally:
        ring.close()
        os.close(directory)
    assert isinstance(got[0], OSError) and got[0].errno == errno.EISDIR


def test_the_pool_path_and_a_failing_read_through_the_block_layer(disk_image):
    """Every read forced through the worker pool (as for O_DIRECT backing): same data, same
    events and checks, and an OSError in the worker reaches the caller."""
    rule = InjectError(event="read_aio", errno=5, sector=100)
    device = build_device(disk_image, rules=[rule], io_threads=3, align=4096)
    image = device.stack.image
    image._read_mode = image._write_mode = POOL
    expected = bytearray(disk_image.read_bytes())

    async def main():
        assert bytes(await device.read(10, 5000)) == bytes(expected[10:5010])
        with pytest.raises(OSError) as failure:
            await device.read(100 * 512, 512)
        assert failure.value.errno == 5
        await device.write(1000, b"abc")  # unaligned: read-modify-write in the pool
        expected[1000:1003] = b"abc"
        assert bytes(await device.read(0, 8192)) == bytes(expected[:8192])
        with pytest.raises(OSError):
            await image._in_pool(os.pread, -1, 10, 0)

    trio.run(main)
    assert image.pool_reads >= 3
    image.close()
    assert disk_image.read_bytes()[:8192] == bytes(expected[:8192])


def test_a_disk_image_maps_only_what_the_page_cache_holds(disk_image):
    image = Image(str(disk_image))
    expected = disk_image.read_bytes()
    length = MAPPED_READ_MIN
    image.pread(0, 4 * MiB)  # all cached
    if image.io_mode != NOWAIT or image._cachestat is None:
        # overlayfs (a container's /var/tmp) reads blind, and without cachestat(2) (Linux <
        # 6.5, or seccomp) nothing says a range is cached: never mapped
        assert image.io_mode != INLINE and not image.can_map(0, length)
    else:
        assert image.can_map(0, length)
        view = image.read_mapped(MiB, length)
        assert view == expected[MiB : MiB + length]
        view.release()
        _drop_cache(image)
        assert not image.can_map(MiB, length)  # the loop would wait for the disk
        image.pread(MiB, 4096)
        assert not image.can_map(MiB, length)  # only partly cached
    image.close()
    direct = Image(str(disk_image), direct=True)
    direct.pread(0, 4096)
    assert not direct.can_map(0, 4096)  # O_DIRECT reads never come from the page cache
    direct.close()


def test_no_io_threads_means_everything_inline(disk_image):
    image = Image(str(disk_image), io_threads=0)
    assert image.io_mode == INLINE
    _drop_cache(image)
    assert bytes(trio.run(image.read, 0, 256)) == bytes(range(256))
    assert image.pool_reads == 0 and image._pool is None
    image.close()


def test_worker_pool_bounds_its_threads():
    pool = WorkerPool(2)
    barrier = threading.Barrier(2, timeout=30)
    running = []

    def job(i):
        running.append(threading.current_thread().name)
        if i < 2:
            barrier.wait()  # the first two run at the same time
        return i * 10

    async def main():
        results = []

        async def one(i):
            results.append(await pool.run(job, i))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(one, i)
        return sorted(results)

    assert trio.run(main) == [0, 10, 20, 30, 40, 50]
    assert len(set(running)) == 2


# ---- through a real mount --------------------------------------------------------------------


@pytest.mark.parametrize("options", ["poll-us=0,io-threads=1", "poll-us=200,io-threads=4"])
def test_cold_disk_image_through_the_mount(mount, options):
    base = Path(tempfile.mkdtemp(prefix="blkfuse-speed-", dir="/var/tmp"))
    try:
        image = base / "cold.img"
        data = os.urandom(8 * MiB)
        image.write_bytes(data)
        m = mount("-o", options, image=image)
        info = m.status()["info"]
        assert info["io"] in (NOWAIT, POOL, INLINE, BLIND) and info["poll_us"] == int(
            options.split(",")[0][8:]
        )
        fd = os.open(image, os.O_RDONLY)
        os.fsync(fd)  # dirty pages stay cached through DONTNEED
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        errors = []

        def reader(k):
            try:
                f = os.open(m.file, os.O_RDONLY)
                try:
                    for i in range(k, 128, 8):
                        offset = i * 64 * 1024
                        assert os.pread(f, 4096, offset) == data[offset : offset + 4096]
                finally:
                    os.close(f)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        reads = m.status()["backing_reads"]
        assert sum(reads.values()) >= 128  # every request's read, counted once
        if info["io_uring"]:
            # eight readers at once: misses met other requests waiting, so some went to the
            # ring, answered later (fs.read_nowait's PendingReply)
            assert reads["io_uring"] > 0 and reads["pool"] == 0, reads
        m.umount()
    finally:
        for p in base.iterdir():
            p.unlink()
        base.rmdir()


def test_large_reads_through_the_mount_come_from_a_mapping(mount):
    data = os.urandom(4 * MiB + 3000)  # the end is not on a page boundary
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="blkfuse-mapped-") as image:
        image.write(data)
        image.flush()
        m = mount("-o", "inject-error.0.event=none,inject-error.0.sector=100", image=image.name)
        _read_large_through(m, data)
        reads = m.status()["backing_reads"]
        assert reads["mapped"] >= 4, reads
        m.umount()


def _read_large_through(m, data):
    fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    try:
        for offset in (MiB, MiB + MiB // 2, 2 * MiB, 3 * MiB + 4096):  # the last: to the end
            got = os.preadv(fd, [buffer], offset)
            assert buffer[:got] == data[offset : offset + MiB]
        with pytest.raises(OSError) as failed:  # the rule's sector: the full path, which fails
            os.preadv(fd, [buffer], 0)
        assert failed.value.errno == errno.EIO
    finally:
        os.close(fd)
        buffer.close()


def test_bad_speed_option_at_mount_is_one_line(mount):
    m, r = mount("-o", "io-threads=-1", expect_ok=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "blkfuse: option io-threads: expects a whole number from 0 to 256, not \"-1\""
    )


def test_check_accepts_speed_options(fuse_dir):
    rules = fuse_dir / "rules.conf"
    rules.write_text("")
    r = blkfuse("check", rules, "-o", "poll-us=0,io-threads=2")
    assert r.returncode == 0, r.stderr
    assert "io-threads=2 (not portable: blkfuse's own tuning)" in r.stdout
    assert "poll-us=0 (not portable: blkfuse's own tuning)" in r.stdout


def test_mount_polls_by_default_or_as_the_environment_says(mount):
    m = mount()
    expected = int(os.environ.get("BLKFUSE_POLL_US", fuseloop.DEFAULT_POLL_US))
    info = m.status()["info"]
    assert info["poll_us"] == expected
    assert info["io_threads"] == 4


def test_only_dev_fuse_waits_are_changed():
    """trio's own wake-up socket and any other fd keep trio's wait: no spin is spent on them."""
    loop = fuseloop.install(50)
    r, w = os.pipe()
    try:

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.lowlevel.wait_readable, r)
                await trio.sleep(0.05)
                os.write(w, b"x")

        trio.run(main)
        assert not loop.idle()  # it knows no /dev/fuse fd: never "idle" by mistake
        assert loop.window.ns == 0
    finally:
        fuseloop.uninstall()
        os.close(r)
        os.close(w)
