"""The backing image's lock, taken the way QEMU's `locking=on` takes it (block/file-posix.c).

So that two writers never share one image unknowingly -- two blkfuse mounts, or blkfuse and a
QEMU that opened the image itself -- a mount takes QEMU's open-file-description (OFD) locks:
one shared lock byte per permission it uses (byte 100 + bit: consistent read, write, write
unchanged, and resize when growable) and one per permission it does not share with others
(byte 200 + bit: write and resize, as QEMU's BlockBackend shares only consistent read and write
unchanged). Then, as QEMU does, it tests for conflicts: someone who does not share what we use
(a lock on 200 + bit), or who uses what we do not share (a lock on 100 + bit). QEMU 7.2 and
blkfuse thus refuse each other's writers, and two read-only mounts may share an image.

An OFD lock belongs to the open file (the image's fd in the daemon): it goes when the daemon
closes the image or dies, whatever way. F_OFD_GETLK reports the holder's pid as -1 (an OFD
lock has no owning process), so whoever holds it is found another way (holders.py, and the
status of the blkfuse mounts).
"""

import errno
import fcntl
import os
import struct

PERM_BASE = 100
SHARED_BASE = 200
# QEMU 7.2's BLK_PERM_* bits (include/block/block-common.h), by bit number.
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
PERM_NAMES = {
    CONSISTENT_READ: "consistent read",
    WRITE: "write",
    WRITE_UNCHANGED: "write unchanged",
    RESIZE: "resize",
}

# struct flock on Linux x86-64 and arm64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (and padding).
_FLOCK = "hhqqi4x"


class LockConflict(Exception):
    """Someone holds a lock that conflicts with ours; `.perm` names the permission."""

    def __init__(self, perm: int, theirs: str):
        self.perm = perm
        self.theirs = theirs  # "uses" or "does not share"
        super().__init__(f'another user of the image {theirs} the "{PERM_NAMES[perm]}" permission')


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel answers (F_UNLCK: no conflict)."""
    answer = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
    return struct.unpack(_FLOCK, answer)[0]


def permissions(read_only: bool, growable: bool) -> tuple[set[int], set[int]]:
    """(permissions used, permissions not shared) for a mount, as QEMU's BlockBackend."""
    used = {CONSISTENT_READ}
    if not read_only:
        used |= {WRITE, WRITE_UNCHANGED}
        if growable:
            used.add(RESIZE)
    return used, {WRITE, RESIZE}


def acquire(fd: int, *, read_only: bool, growable: bool) -> None:
    """Take the lock bytes on the open image `fd`, then test for conflicts.

    LockConflict if another holder conflicts (our bytes are released again); OSError if the
    file system cannot lock at all (some network file systems).
    """
    used, unshared = permissions(read_only, growable)
    try:
        for bit in used:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + bit)
        for bit in unshared:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + bit)
        # A shared lock only fails against an exclusive one, which QEMU never takes: the
        # conflicts show in a test for an exclusive lock, as in QEMU's raw_check_lock_bytes.
        for bit in sorted(used):
            if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + bit) != fcntl.F_UNLCK:
                raise LockConflict(bit, "does not share")
        for bit in sorted(unshared):
            if _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + bit) != fcntl.F_UNLCK:
                raise LockConflict(bit, "uses")
    except BaseException:
        release(fd)
        raise


def release(fd: int) -> None:
    """Drop every lock byte of ours (closing the image drops them too)."""
    try:
        fcntl.fcntl(
            fd,
            fcntl.F_OFD_SETLK,
            struct.pack(
                _FLOCK, fcntl.F_UNLCK, os.SEEK_SET, PERM_BASE, SHARED_BASE + 64 - PERM_BASE, 0
            ),
        )
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
