"""The image file through a real mount: the directory, reads and writes from threads and from
real clients (dd, fio, qemu-img, qemu-io), read-only mounts, align, max-transfer, writethrough."""

import errno
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import blkfuse
from imageio import KiB, MiB, aligned, open_image, pattern


def test_directory_has_exactly_the_image_and_control(mount):
    m = mount(size=3 * MiB + 512)
    assert sorted(os.listdir(m.mnt)) == ["control", m.image.name]
    assert os.stat(m.file).st_size == 3 * MiB + 512
    os.truncate(m.image, 5 * MiB)  # the size is the backing file's, live
    assert os.stat(m.file).st_size == 5 * MiB
    with pytest.raises(OSError) as e:
        open(m.mnt / "other", "w")
    assert e.value.errno in (errno.EPERM, errno.EACCES)


def test_name_option_and_truncate_through_the_mount(mount):
    m = mount("-o", "growable=on", name="vda.raw")  # fixed size unless growable
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
        assert backing[i * chunk : (i + 1) * chunk] == pattern(chunk, seed=i)
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
    m.ctl("inject-error event=read_aio errno=ENOSPC")  # control stays writable
    fd = open_image(m, os.O_RDONLY)
    with pytest.raises(OSError) as e:
        os.pread(fd, 512, 0)
    os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert m.image.read_bytes() == pattern(8 * KiB)


def test_dd_direct_hits_injected_eio(mount):
    m = mount("-o", "inject-error.0.event=read_aio,inject-error.0.sector=8", data=pattern(MiB))
    ok = subprocess.run(
        ["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        ["dd", f"if={m.file}", "of=/dev/null", "bs=4k", "skip=1", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "Input/output error" in bad.stderr
    st = m.status()
    assert st["errors_injected"] == [{"errno": errno.EIO, "name": "EIO", "count": 1}]
    assert st["rules"][0]["hits"] == 1


def test_fio_reports_the_injected_error(mount, fuse_dir):
    m = mount(
        "-o",
        "inject-error.0.event=read_aio,inject-error.0.errno=ENOSPC,inject-error.0.sector=256",
        data=pattern(MiB),
    )
    r = subprocess.run(
        [
            "fio",
            "--name=probe",
            f"--filename={m.file}",
            "--rw=read",
            "--bs=4k",
            "--size=1M",
            "--direct=1",
            "--ioengine=psync",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        cwd=fuse_dir,
    )
    assert r.returncode != 0
    out = r.stdout[r.stdout.index("{") :]
    job = json.loads(out)["jobs"][0]
    assert job["error"] == errno.ENOSPC
    assert "No space left on device" in r.stderr + r.stdout


def test_qemu_img_convert_fails_on_injected_sector(mount, fuse_dir):
    m = mount(
        "-o", "inject-error.0.event=read_aio,inject-error.0.sector=1000", data=pattern(2 * MiB)
    )
    out = fuse_dir / "out.raw"
    r = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(m.file), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Input/output error" in r.stderr
    r = blkfuse("ctl", m.mnt, "clear")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(m.file), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == pattern(2 * MiB)


def test_qemu_io_with_o_direct(mount):
    m = mount(data=pattern(MiB))
    r = subprocess.run(
        [
            "qemu-io",
            "-t",
            "none",
            "-f",
            "raw",
            str(m.file),
            "-c",
            "write -P 0xab 4k 4k",
            "-c",
            "read -P 0xab 4k 4k",
            "-c",
            "read 0 4k",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "fail" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert m.image.read_bytes()[4 * KiB : 8 * KiB] == b"\xab" * 4 * KiB
    m.ctl("inject-error event=read_aio sector=0 errno=EIO")
    r = subprocess.run(
        ["qemu-io", "-t", "none", "-f", "raw", str(m.file), "-c", "read 0 4k"],
        capture_output=True,
        text=True,
    )
    assert "read failed: Input/output error" in r.stdout + r.stderr


def test_align_pads_to_read_modify_write(mount):
    m = mount("-o", "align=4096", data=pattern(64 * KiB))
    fd = open_image(m)
    os.pwrite(fd, b"\xee" * 100, 4096 + 10)
    os.close(fd)
    ev = m.status()["events"]
    for name in (
        "pwritev_rmw_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_head",
        "pwritev_rmw_after_tail",
        "pwritev",
        "pwritev_done",
    ):
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
    data = pattern(128 * KiB, seed=3)  # one FUSE request (max_write is 128 KiB)
    assert os.pwrite(fd, aligned(data), 0) == len(data)
    os.close(fd)
    ev = m.status()["events"]
    assert ev["write_aio"] == 2 and ev["pwritev_done"] == 2
    assert m.image.read_bytes()[: len(data)] == data


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
    fd = open_image(m)  # a plain handle does not flush
    os.pwrite(fd, b"c" * 4096, 8192)
    os.close(fd)
    assert m.status()["events"]["flush_to_os"] == 2
