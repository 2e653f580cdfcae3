"""What a mount's directory holds: the image file and `control`, and the names they may have.

Defined once here for the daemon (which checks `--name` before mounting), the FUSE layer and
the CLI (which finds a mount's control file), none of which needs the others to know it.
"""

import os

CONTROL_NAME = "control"


def image_name_problem(name: str) -> str | None:
    """Why `name` cannot be the image file's name in the mount, or None if it can."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return 'it must be a file name (not empty, ".", ".." or containing "/")'
    if name == CONTROL_NAME:
        return f'"{CONTROL_NAME}" is the control file'
    return None


def control_path(mountpoint: str) -> str:
    """The control file of the mount at `mountpoint`."""
    return os.path.join(mountpoint, CONTROL_NAME)
