"""Opening the backing file caches none of it: QEMU never reads at open, and a page in the
cache changes what SEEK_DATA says of an unwritten extent (the qsd differential found it: a
probe read at offset 0 started readahead, and after a ZERO_RANGE there the range was data)."""

import os
import subprocess

from blkfuse.block.image import FALLOC_FL_ZERO_RANGE, Image, fallocate


def cached_bytes(path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_opening_the_image_reads_none_of_it(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(65536)
        f.seek(32768)
        f.write(b"x" * 512)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert cached_bytes(path) == 0
    image = Image(str(path))
    try:
        assert cached_bytes(path) == 0
        fallocate(image.fd, FALLOC_FL_ZERO_RANGE, 12800, 2048)
        assert os.lseek(image.fd, 15560, os.SEEK_DATA) == 32768  # still a hole there
    finally:
        image.close()
