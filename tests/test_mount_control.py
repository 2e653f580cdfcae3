"""The control file as a program uses it, through real mounts: reading an answer back on the
same open file, whatever the offset."""

import json
import os

from conftest import blkfuse


def test_the_answer_is_read_from_its_start_whatever_the_offset(mount):
    m = mount()
    fd = os.open(m.control, os.O_RDWR)
    try:
        os.write(fd, b"status json\n")               # the write moved the offset to 12
        chunks = []
        while chunk := os.read(fd, 100):             # plain read(): from the answer's start
            chunks.append(chunk)
        answer = b"".join(chunks)
        assert json.loads(answer)["info"]["pid"] == m.pid
        assert os.pread(fd, 1 << 20, 0) == answer    # pread at 0 reads it again
        os.lseek(fd, 12345, os.SEEK_SET)             # a new command, at another offset
        os.write(fd, b"help\n")
        assert os.read(fd, 1 << 20).startswith(b"commands")
    finally:
        os.close(fd)
    with open(m.control, "r+") as f:                 # buffered text I/O, as a script does it
        f.write("status json\n")
        f.flush()
        assert json.loads(f.read())["state"] == 1


def test_an_error_is_read_from_its_start_too(mount):
    m = mount()
    fd = os.open(m.control, os.O_RDWR)
    try:
        try:
            os.write(fd, b"resume nobody\n")
        except OSError:
            pass
        assert os.read(fd, 1 << 20).startswith(b"error: line 1: ")
    finally:
        os.close(fd)
    r = blkfuse("status", m.mnt, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["last_error"].startswith("line 1")
