"""A sparse copy of an image file: what `powercut save=PATH` and `powercut-save` write.

Only the data extents are copied (SEEK_DATA/SEEK_HOLE), so a copy of a mostly empty 16 GiB
image takes what its data takes. The copy is written beside PATH and renamed over it, so PATH
is never a half-written image.
"""

import errno as _errno
import os

_CHUNK = 8 << 20


def sparse_copy(fd: int, path: str) -> None:
    """Copy the file open as `fd` to `path`, holes as holes. Raises OSError. The file is
    opened again for this (an O_DIRECT descriptor, cache=none, would refuse plain buffers)."""
    source = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy(source, path)
    finally:
        os.close(source)


def _copy(fd: int, path: str) -> None:
    size = os.fstat(fd).st_size
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start, end in _data_extents(fd, size):
            position = start
            while position < end:
                chunk = os.pread(fd, min(_CHUNK, end - position), position)
                if not chunk:
                    raise OSError(_errno.EIO, "the image ended while being copied")
                done = 0
                while done < len(chunk):
                    done += os.pwrite(out, chunk[done:], position + done)
                position += len(chunk)
        os.ftruncate(out, size)
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(temporary)
        raise
    os.close(out)
    os.rename(temporary, path)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each data extent; the whole file if it cannot tell."""
    extents = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == _errno.ENXIO:
                break  # holes to the end
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        position = end
    return extents
