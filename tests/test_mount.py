"""Real FUSE mounts: the image file, the control file, the CLI, the daemon's life."""

import errno
import json
import mmap
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import blkfuse, force_unmount, is_mounted

KiB = 1024
MiB = 1024 * KiB


def pattern(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def aligned(data):
    """An O_DIRECT-safe buffer holding `data`."""
    buf = mmap.mmap(-1, max(len(data), 4096))
    buf.write(data)
    return memoryview(buf)[:len(data)]


def open_image(m, flags=os.O_RDWR):
    return os.open(m.file, flags)


class Writer(threading.Thread):
    """A pwrite in its own thread (it may block at a breakpoint)."""

    def __init__(self, m, offset, data, flags=os.O_RDWR):
        super().__init__(daemon=True)
        self.m, self.offset, self.data, self.flags = m, offset, data, flags
        self.result = self.error = None

    def run(self):
        try:
            fd = open_image(self.m, self.flags)
            try:
                self.result = os.pwrite(fd, self.data, self.offset)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = e


# ---- the directory --------------------------------------------------------------------------

def test_directory_has_exactly_the_image_and_control(mount):
    m = mount(size=3 * MiB + 512)
    assert sorted(os.listdir(m.mnt)) == ["control", m.image.name]
    assert os.stat(m.file).st_size == 3 * MiB + 512
    os.truncate(m.image, 5 * MiB)                       # the size is the backing file's, live
    assert os.stat(m.file).st_size == 5 * MiB
    with pytest.raises(OSError) as e:
        open(m.mnt / "other", "w")
    assert e.value.errno in (errno.EPERM, errno.EACCES)


def test_name_option_and_truncate_through_the_mount(mount):
    m = mount("-o", "growable=on", name="vda.raw")       # fixed size unless growable
    assert sorted(os.listdir(m.mnt)) == ["control", "vda.raw"]
    os.truncate(m.file, 2 * MiB)
    assert os.path.getsize(m.image) == 2 * MiB


def test_blkdebug_filename_form(mount, fuse_dir):
    rules = fuse_dir / "rules.conf"
    rules.write_text('[inject-error]\nevent = "read_aio"\nerrno = "28"\n')
    img = fuse_dir / "plain.img"
    img.write_bytes(bytes(64 * KiB))
    m = mount(image=f"blkdebug:{rules}:{img}")
    m.name = "plain.img"
    fd = open_image(m, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        os.pread(fd, 512, 0)
    os.close(fd)
    assert e.value.errno == errno.ENOSPC
    [rule] = m.status()["rules"]
    assert rule["source"].startswith(str(rules))


# ---- data path ------------------------------------------------------------------------------

def test_pread_pwrite_fsync_from_threads(mount):
    m = mount(size=4 * MiB)
    chunk = 64 * KiB

    def work(i):
        fd = open_image(m)
        try:
            data = pattern(chunk, seed=i)
            assert os.pwrite(fd, data, i * chunk) == chunk
            os.fsync(fd)
            assert os.pread(fd, chunk, i * chunk) == data
        finally:
            os.close(fd)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(64)))
    backing = m.image.read_bytes()
    for i in range(64):
        assert backing[i * chunk:(i + 1) * chunk] == pattern(chunk, seed=i)
    ev = m.status()["events"]
    assert ev["write_aio"] == 64 and ev["read_aio"] == 64 and ev["flush_to_os"] == 64


def test_read_only_mount_refuses_writes(mount):
    m = mount("--read-only", data=pattern(8 * KiB))
    with pytest.raises(OSError) as e:
        os.open(m.file, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.truncate(m.file, 0)
    assert e.value.errno == errno.EROFS
    fd = open_image(m, os.O_RDONLY)
    assert os.pread(fd, 8 * KiB, 0) == pattern(8 * KiB)
    os.close(fd)
    m.ctl("inject-error event=read_aio errno=ENOSPC")     # control stays writable
    fd = open_image(m, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        os.pread(fd, 512, 0)
    os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert m.image.read_bytes() == pattern(8 * KiB)


def test_dd_direct_hits_injected_eio(mount):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.sector=8", data=pattern(MiB))
    ok = subprocess.run(["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "count=1",
                         "iflag=direct"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "skip=1", "count=1",
                          "iflag=direct"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Input/output error" in bad.stderr
    st = m.status()
    assert st["errors_injected"] == [{"errno": errno.EIO, "name": "EIO", "count": 1}]
    assert st["rules"][0]["hits"] == 1


def test_fio_reports_the_injected_error(mount, fuse_dir):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=ENOSPC,"
                    "inject-error.0.sector=256", data=pattern(MiB))
    r = subprocess.run(["fio", "--name=probe", f"--filename={m.file}", "--rw=read", "--bs=4k",
                        "--size=1M", "--direct=1", "--ioengine=psync", "--output-format=json"],
                       capture_output=True, text=True, cwd=fuse_dir)
    assert r.returncode != 0
    out = r.stdout[r.stdout.index("{"):]
    job = json.loads(out)["jobs"][0]
    assert job["error"] == errno.ENOSPC
    assert "No space left on device" in r.stderr + r.stdout


def test_qemu_img_convert_fails_on_injected_sector(mount, fuse_dir):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.sector=1000",
              data=pattern(2 * MiB))
    out = fuse_dir / "out.raw"
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(m.file), str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Input/output error" in r.stderr
    r = blkfuse("ctl", m.mnt, "clear")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(m.file), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == pattern(2 * MiB)


def test_qemu_io_with_o_direct(mount):
    m = mount(data=pattern(MiB))
    r = subprocess.run(["qemu-io", "-t", "none", "-f", "raw", str(m.file),
                        "-c", "write -P 0xab 4k 4k", "-c", "read -P 0xab 4k 4k",
                        "-c", "read 0 4k"], capture_output=True, text=True)
    assert r.returncode == 0 and "fail" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert m.image.read_bytes()[4 * KiB:8 * KiB] == b"\xab" * 4 * KiB
    m.ctl("inject-error event=read_aio sector=0 errno=EIO")
    r = subprocess.run(["qemu-io", "-t", "none", "-f", "raw", str(m.file), "-c", "read 0 4k"],
                       capture_output=True, text=True)
    assert "read failed: Input/output error" in r.stdout + r.stderr


def test_align_pads_to_read_modify_write(mount):
    m = mount("-o", "align=4096", data=pattern(64 * KiB))
    fd = open_image(m)
    os.pwrite(fd, b"\xee" * 100, 4096 + 10)
    os.close(fd)
    ev = m.status()["events"]
    for name in ("pwritev_rmw_head", "pwritev_rmw_tail", "pwritev_rmw_after_head",
                 "pwritev_rmw_after_tail", "pwritev", "pwritev_done"):
        assert ev.get(name) == 1, (name, ev)
    expect = bytearray(pattern(64 * KiB))
    expect[4106:4206] = b"\xee" * 100
    assert m.image.read_bytes() == bytes(expect)
    # an error on the padding read fails the write and leaves the data unchanged
    m.ctl("inject-error event=pwritev_rmw_head iotype=read errno=ENOSPC")
    fd = open_image(m)
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"\x11" * 100, 8192 + 10)
    os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert m.image.read_bytes() == bytes(expect)


def test_max_transfer_splits_requests(mount):
    m = mount("-o", "max-transfer=65536", size=MiB)
    fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)
    data = pattern(128 * KiB, seed=3)      # one FUSE request (max_write is 128 KiB)
    assert os.pwrite(fd, aligned(data), 0) == len(data)
    os.close(fd)
    ev = m.status()["events"]
    assert ev["write_aio"] == 2 and ev["pwritev_done"] == 2
    assert m.image.read_bytes()[:len(data)] == data


def test_o_dsync_writes_through(mount):
    m = mount(size=MiB)
    fd = os.open(m.file, os.O_RDWR | os.O_DSYNC)
    os.pwrite(fd, b"a" * 4096, 0)
    assert m.status()["events"].get("flush_to_os") == 1
    # a flush error armed by the write fails the write, although its data reached the image
    m.ctl("inject-error event=write_aio iotype=flush errno=EIO")
    with pytest.raises(OSError) as e:
        os.pwrite(fd, b"b" * 4096, 4096)
    assert e.value.errno == errno.EIO
    os.close(fd)
    assert m.image.read_bytes()[4096:8192] == b"b" * 4096
    fd = open_image(m)                      # a plain handle does not flush
    os.pwrite(fd, b"c" * 4096, 8192)
    os.close(fd)
    assert m.status()["events"]["flush_to_os"] == 2


# ---- breakpoints ----------------------------------------------------------------------------

def test_breakpoint_suspends_one_write_while_reads_go_on(mount):
    m = mount(data=pattern(MiB))
    with open(m.control, "w") as f:                  # as `echo "break write_aio A" > control`
        f.write("break write_aio A\n")
    w = Writer(m, 0, b"\x5a" * 4096)
    w.start()
    m.ctl("wait_break A 60")
    assert w.is_alive() and w.result is None
    [s] = m.status()["suspended"]
    assert (s["tags"], s["event"], s["op"], s["offset"], s["length"]) == \
        (["A"], "write_aio", "write", 0, 4096)
    assert "A at write_aio: write offset=0 length=4096" in m.status_text()
    fd = open_image(m, os.O_RDONLY)                  # another request is served meanwhile
    assert os.pread(fd, 4096, 65536) == pattern(MiB)[65536:65536 + 4096]
    os.close(fd)
    assert m.image.read_bytes()[:4096] == pattern(MiB)[:4096]      # not written yet
    m.ctl("resume A")
    w.join(60)
    assert not w.is_alive() and w.error is None and w.result == 4096
    assert m.image.read_bytes()[:4096] == b"\x5a" * 4096
    assert m.status()["suspended"] == [] and m.status()["breakpoints"] == []


def test_a_suspended_read_lets_writes_and_fsyncs_through(mount):
    m = mount(data=pattern(MiB))
    m.ctl("break read_aio R")
    got = {}

    def reader():
        fd = open_image(m, os.O_RDONLY)
        got["data"] = os.pread(fd, 4096, 0)
        os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    m.ctl("wait_break R 60")
    fd = open_image(m)
    assert os.pwrite(fd, b"w" * 4096, 0) == 4096      # the write goes first
    os.fsync(fd)
    os.close(fd)
    assert t.is_alive()
    m.ctl("resume R")
    t.join(60)
    assert got["data"] == b"w" * 4096                # the read runs after its breakpoint


def test_many_suspended_requests_do_not_stop_the_others(mount):
    """More suspended requests than pyfuse3's default worker limit (99)."""
    m = mount(data=pattern(MiB))
    n = 120
    results = [None] * n

    def reader(i):
        fd = open_image(m, os.O_RDONLY)
        try:
            results[i] = os.pread(fd, 512, i * 512)
        finally:
            os.close(fd)

    threads = []
    for i in range(n):
        m.ctl(f"break read_aio T{i}")
        t = threading.Thread(target=reader, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        m.ctl(f"wait_break T{i} 60")
    assert len(m.status()["suspended"]) == n
    fd = open_image(m)                               # still served: a write and a read
    os.pwrite(fd, b"q" * 512, 900 * KiB)
    assert os.pread(fd, 512, 900 * KiB) == b"q" * 512
    os.close(fd)
    m.ctl("\n".join(f"resume T{i}" for i in range(n)))
    for t in threads:
        t.join(60)
    data = pattern(MiB)
    assert results == [data[i * 512:(i + 1) * 512] for i in range(n)]


def test_mountpoint_with_a_space(mount):
    m = mount(mnt_name="my mnt")
    assert m.status()["info"]["mountpoint"].endswith("my mnt")
    m.umount()


def test_wait_break_times_out_with_etimedout(mount):
    m = mount()
    m.ctl("break read_aio T")
    with pytest.raises(OSError) as e:
        m.ctl("wait_break T 0.05")
    assert e.value.errno == errno.ETIMEDOUT
    assert "T" in m.status()["last_error"]


def test_umount_releases_a_suspended_write_and_keeps_its_data(mount):
    m = mount(size=MiB)
    m.ctl("break pwritev B")
    w = Writer(m, 8192, b"\x77" * 4096)
    w.start()
    m.ctl("wait_break B 60")
    r = blkfuse("umount", "--lazy", m.mnt)         # the writer has the image open: busy
    assert r.returncode == 0, r.stderr
    w.join(60)
    assert not w.is_alive() and w.error is None and w.result == 4096
    assert not is_mounted(m.mnt)
    assert m.image.read_bytes()[8192:12288] == b"\x77" * 4096


def test_umount_fails_a_pending_wait_break_with_eshutdown(mount):
    m = mount()
    m.ctl("break read_aio Z")
    box = {}

    def waiter():
        try:
            m._ctl("wait_break Z")
        except OSError as e:
            box["errno"] = e.errno

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    while m.status()["waiting"] != ["Z"]:           # the daemon holds the wait
        assert t.is_alive()
        time.sleep(0.01)
    assert "wait_break pending: Z" in m.status_text()
    m.umount()
    t.join(60)
    assert not t.is_alive() and box["errno"] == errno.ESHUTDOWN


def test_a_pending_wait_break_does_not_hold_back_other_commands(mount):
    """The kernel serializes writes per inode; each open of control is its own inode."""
    m = mount(data=pattern(64 * KiB))
    m.ctl("break read_aio X")
    box = {}

    def waiter():
        box["answer"] = m._ctl("wait_break X")

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    while m.status()["waiting"] != ["X"]:           # status json is a write: not held back
        time.sleep(0.01)
    m.ctl("inject-error event=write_aio errno=ENOSPC")
    def reader():
        fd = open_image(m, os.O_RDONLY)
        box["read"] = os.pread(fd, 512, 0)
        os.close(fd)

    r = threading.Thread(target=reader, daemon=True)
    r.start()
    t.join(60)
    assert box["answer"] == "suspended at X\n"
    m.ctl("resume X")
    r.join(60)
    assert box["read"] == pattern(512)


def test_umount_with_a_file_held_open(mount):
    m = mount(data=pattern(64 * KiB))
    fd = open_image(m)
    try:
        assert os.pwrite(fd, b"h" * 512, 0) == 512
        r = blkfuse("umount", "--lazy", m.mnt)   # the open file delays it (a grace), no more
        assert r.returncode == 0 and not is_mounted(m.mnt), r.stderr
        assert m.image.read_bytes()[:512] == b"h" * 512
        with pytest.raises(OSError):
            os.pread(fd, 512, 0)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_sigkill_keeps_acknowledged_writes(mount):
    m = mount(size=MiB)
    fd = open_image(m)
    for i in range(16):
        assert os.pwrite(fd, pattern(4096, seed=i), i * 4096) == 4096
    os.close(fd)
    pid = m.status()["info"]["pid"]
    os.kill(pid, signal.SIGKILL)
    force_unmount(m.mnt)
    assert not is_mounted(m.mnt)
    data = m.image.read_bytes()
    for i in range(16):
        assert data[i * 4096:(i + 1) * 4096] == pattern(4096, seed=i)


def test_umount_of_a_dead_daemon_removes_the_mount(mount):
    m = mount()
    pid = m.status()["info"]["pid"]
    os.kill(pid, signal.SIGKILL)
    r = blkfuse("umount", m.mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.mnt)


# ---- control file through the mount ---------------------------------------------------------

def test_bad_control_commands_apply_nothing(mount):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=28")
    before = m.status()
    with pytest.raises(OSError) as e:
        m.ctl("inject-error event=write_aio\nbreak write_aio A\nfrobnicate now\n")
    assert e.value.errno == errno.EINVAL
    after = m.status()
    assert after["rules"] == before["rules"] and after["breakpoints"] == []
    assert after["last_error"] == 'line 3: unknown command "frobnicate" (try "help")'
    assert "line 3: unknown command" in m.status_text()
    r = blkfuse("ctl", m.mnt, "break", "write_aoi", "A")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and 'unknown event "write_aoi"' in r.stderr
    r = blkfuse("ctl", m.mnt, "resume", "nobody")
    assert r.returncode == 1 and "nobody" in r.stderr and "ENOENT" in r.stderr


def test_ctl_adds_rules_and_reports_ids(mount):
    m = mount()
    r = blkfuse("ctl", m.mnt, "inject-error", "event=read_aio", "errno=ENOSPC", "once=on")
    assert r.returncode == 0 and r.stdout == "added rule 1\n"
    assert "added rule 1" in m.status_text()
    fd = open_image(m, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        os.pread(fd, 512, 0)
    assert e.value.errno == errno.ENOSPC
    assert os.pread(fd, 512, 0) == bytes(512)           # once: gone
    os.close(fd)
    r = blkfuse("status", m.mnt, "--json")                # used up: listed as spent
    assert r.returncode == 0
    assert [(x["id"], x["spent"], x["hits"]) for x in json.loads(r.stdout)["rules"]] == \
        [(1, True, 1)]
    r = blkfuse("status", m.mnt)
    assert r.returncode == 0 and "errors injected: ENOSPC(28)=1" in r.stdout


def test_reload_rereads_the_config(mount, fuse_dir):
    conf = fuse_dir / "rules.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\n')
    m = mount("--config", conf)
    conf.write_text('[inject-error]\nevent = "write_aio"\nerrno = "28"\n')
    m.ctl("reload")
    assert [r["event"] for r in m.status()["rules"]] == ["write_aio"]
    conf.write_text('[inject-error]\nevent = "write_aoi"\n')
    with pytest.raises(OSError) as e:
        m.ctl("reload")
    assert e.value.errno == errno.EINVAL
    st = m.status()
    assert [r["event"] for r in st["rules"]] == ["write_aio"]
    assert "rules.conf:3" in st["last_error"] or "write_aoi" in st["last_error"]


def test_other_users_cannot_write_control(mount):
    m = mount("--allow-other")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                        # child: become nobody
        code = 99
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            results = []
            try:
                os.open(m.control, os.O_WRONLY)
                results.append("open-ok")
            except OSError as e:
                results.append(errno.errorcode[e.errno])
            try:
                with open(m.control) as f:
                    results.append("read-ok" if "state:" in f.read() else "read-empty")
            except OSError as e:
                results.append(errno.errorcode[e.errno])
            os.write(w, " ".join(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert out == "EACCES read-ok"
    assert m.status()["rules"] == []


# ---- mount failures: one line, exit 1, nothing mounted --------------------------------------

def _assert_failed(m, r, *words):
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("blkfuse: "), r.stderr
    for w in words:
        assert w in r.stderr
    assert not is_mounted(m.mnt)


def test_malformed_rules_at_mount(mount, fuse_dir):
    conf = fuse_dir / "bad.conf"
    conf.write_text('[inject-error]\nevent = "read_aoi"\n')
    m, r = mount("--config", conf, expect_ok=False)
    _assert_failed(m, r, "bad.conf:2", "read_aoi")
    m, r = mount("-o", "inject-error.0.event=read_aio,inject-error.0.errno=-5", expect_ok=False)
    _assert_failed(m, r)
    m, r = mount("-o", "align=3", expect_ok=False)
    _assert_failed(m, r, "align")


def test_two_rule_files_are_refused(mount, fuse_dir):
    a, b = fuse_dir / "a.conf", fuse_dir / "b.conf"
    a.write_text("")
    b.write_text("")
    m, r = mount("--config", a, "-o", f"config={b}", expect_ok=False)
    _assert_failed(m, r, "more than one rules file")


def test_missing_image_and_mountpoints(mount, fuse_dir):
    m, r = mount(image=fuse_dir / "nonexistent.img", expect_ok=False)
    _assert_failed(m, r, "nonexistent.img")
    img = fuse_dir / "x.img"
    img.write_bytes(bytes(4096))
    r = blkfuse("mount", img, fuse_dir / "no-such-dir")
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    m = mount()
    r = blkfuse("mount", img, m.mnt)                      # busy
    assert r.returncode == 1 and "already mounted" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(os.listdir(m.mnt)) == ["control", m.name]


def test_foreground_mount_and_sigterm(fuse_dir):
    img = fuse_dir / "fg.img"
    img.write_bytes(bytes(MiB))
    mnt = fuse_dir / "fg"
    mnt.mkdir()
    from conftest import BLKFUSE
    p = subprocess.Popen(BLKFUSE + ["mount", "--foreground", "--log", str(fuse_dir / "log"),
                                    str(img), str(mnt)])
    try:
        # the log says when it is mounted; poll the mount table without a time threshold
        while not is_mounted(mnt):
            assert p.poll() is None, "foreground mount exited"
            time.sleep(0.01)
        fd = os.open(mnt / "fg.img", os.O_RDWR)
        os.pwrite(fd, b"z" * 512, 0)
        os.close(fd)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert not is_mounted(mnt)
        assert img.read_bytes()[:512] == b"z" * 512
        assert "mounted" in (fuse_dir / "log").read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(mnt)


def test_events_command_lists_every_event():
    from blkfuse.events import EVENTS, REACHABLE_EVENTS
    r = blkfuse("events")
    assert r.returncode == 0
    for name in EVENTS:
        mark = "*" if name in REACHABLE_EVENTS else " "
        assert f"  {mark} {name}" in r.stdout
    assert "block-status" in r.stdout
