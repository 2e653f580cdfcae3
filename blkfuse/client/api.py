"""blkfuse from Python: a mount as a context manager.

    from blkfuse import Mount, ControlError

    with Mount("disk.img", "/tmp/mnt", options={"inject-error.0.event": "read_aio"}) as m:
        fd = os.open(m.image_path, os.O_RDWR | os.O_DIRECT)
        rule = m.inject_error(event="write_aio", errno="ENOSPC", iotype="write")
        ...
        m.remove(rule)

Entering mounts the image exactly as `blkfuse mount` does (the same command, so the daemon
runs in its own process and the caller's process stays free to do the I/O); leaving always
unmounts, in order: every suspended request is resumed and every breakpoint dropped first,
so a test that fails half-way never leaves a process hanging on the mount, then the daemon
is stopped as `blkfuse umount` stops it; a daemon that does not answer is killed and its
mount removed lazily.
"""

import json
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from blkfuse import client
from blkfuse.client import fsstack, mounttab
from blkfuse.errors import ControlError, MountError
from blkfuse.rules import values

StrPath = str | os.PathLike[str]
Options = Mapping[str, object] | str | Sequence[str]

# Hang guard, not a speed limit: `blkfuse mount` returns as soon as the mount is live.
MOUNT_SECONDS = 120.0


def parse_size(size: int | str) -> int:
    """Bytes from 4096, "64M", "1.5G", "512K", "1GiB": the one size grammar (rules/values.py,
    as -o options read sizes; binary units, as qemu-img and truncate). ValueError if not."""
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        return size
    return values.parse_size("size", size)


def option_string(options: Options) -> list[str]:
    """`-o` arguments from a mapping ({"align": 4096}), one "K=V,..." string, or several."""
    if isinstance(options, str):
        return [options]
    if isinstance(options, Mapping):
        # QEMU's option syntax doubles a comma inside a value.
        return [",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in options.items())]
    return [str(o) for o in options]


def mount_args(
    image: StrPath,
    mountpoint: StrPath,
    config: StrPath | None = None,
    options: Options | None = None,
    **mount_flags: object,
) -> list[str]:
    """The `blkfuse mount` arguments for these parameters (after the command itself).

    A flag's keyword is its long option with "_" for "-": name="vda.raw" -> --name vda.raw,
    read_only=True -> --read-only, allow_other, log="FILE", trace="FILE". False/None leave
    it out.
    """
    args = ["mount"]
    if config is not None:
        args += ["--config", os.fspath(config)]
    for o in option_string(options or ()):
        args += ["-o", o]
    for key, value in mount_flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return args + [os.fspath(image), os.fspath(mountpoint)]


def _rule_keys(keys: Mapping[str, object]) -> str:
    words = []
    for key, value in keys.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, (list, tuple, set, frozenset)):
            value = ",".join(str(v) for v in value)
        words.append(shlex.quote(f"{key}={value}"))
    return " ".join(words)


class Mount:
    """One blkfuse mount of `image` at `mountpoint`, for the life of a `with` block.

    `image` is the backing file (or QEMU's "blkdebug:RULES:IMAGE"); `config` a blkdebug
    config file; `options` blockdev-style options (a mapping such as
    {"inject-error.0.event": "read_aio", "align": 4096}, or "K=V,..." strings);
    `mount_flags` the other `blkfuse mount` options by keyword (name=, read_only=True,
    allow_other=True, log=, trace=). The mountpoint directory must exist.

    Once mounted: `image_path` is the image file inside the mount (open it, hand it to
    qemu, losetup it), `control_path` the control file, `backing` the backing image,
    `pid` the daemon. Commands fail with ControlError (`.errno`, `.message`).
    """

    def __init__(
        self,
        image: StrPath,
        mountpoint: StrPath,
        config: StrPath | None = None,
        options: Options | None = None,
        **mount_flags: object,
    ) -> None:
        self.mountpoint = Path(os.path.abspath(mountpoint))
        self.args = mount_args(image, self.mountpoint, config, options, **mount_flags)
        self.name = ""
        self.backing = Path(os.path.abspath(image))
        self.pid: int | None = None
        self.mounted = False

    # -- life ---------------------------------------------------------------------------------

    def mount(self) -> Self:
        """Mount (what entering the `with` block does). MountError with `blkfuse mount`'s
        one-line reason if it fails; nothing is left mounted then."""
        if self.mounted:
            raise MountError(f"{self.mountpoint}: this Mount is already mounted")
        try:
            r = subprocess.run(
                client.blkfuse_command() + self.args,
                capture_output=True,
                text=True,
                timeout=MOUNT_SECONDS,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            client.force_unmount(self.mountpoint)
            raise MountError(
                f"{self.mountpoint}: blkfuse mount did not finish in {MOUNT_SECONDS:g} s"
            ) from None
        if r.returncode != 0:
            # The reason is the last line (click puts its usage text before an option error).
            lines = (r.stderr or r.stdout).strip().splitlines() or [""]
            message = lines[-1].removeprefix("blkfuse: ").removeprefix("Error: ")
            raise MountError(message or f"blkfuse mount failed (exit status {r.returncode})")
        self.mounted = True
        try:
            info = self.status(rules=0)["info"]  # the rule list can be 100,000 long
            self.pid = int(info["pid"])
            self.name = str(info["name"])
            self.backing = Path(info["image"])
        except (ControlError, KeyError, TypeError, ValueError) as e:
            self.close()
            raise MountError(
                f"{self.mountpoint}: mounted, but its status is unreadable: {e}"
            ) from None
        return self

    def close(self, timeout: float = 60.0) -> None:
        """Unmount (what leaving the `with` block does): resume every suspended request and
        drop every breakpoint, then stop the daemon in order (it fsyncs the image); a daemon
        that does not answer is killed and its mount removed. Idempotent. MountError if the
        mount could not be removed at all, or if a loop device still used it (the mount is
        gone all the same; the message names each loop device and where it is mounted, which
        now sits on a dead disk: take them down before closing)."""
        if not self.mounted:
            return
        problem = None
        loops = client.loop_users(self.mountpoint)
        if mounttab.is_blkfuse_mount(self.mountpoint):
            client.release_all(self.mountpoint)
            try:
                client.unmount(self.mountpoint, timeout, lazy=True)
            except MountError as e:
                problem = e
                if self.pid:
                    try:
                        os.kill(self.pid, signal.SIGKILL)  # wedged: end it, then the mount
                    except ProcessLookupError:
                        pass
        if not client.force_unmount(self.mountpoint):
            raise MountError(f"{self.mountpoint}: still mounted ({problem})")
        self.mounted = False
        if loops:  # unmounted all the same (leaving a `with` block always does), but loudly
            raise MountError(client.loop_users_message(str(self.mountpoint), loops, closed=True))

    def __enter__(self) -> Self:
        return self.mount()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.mounted else "not mounted"
        return f"<blkfuse.Mount {self.backing} at {self.mountpoint} ({state})>"

    # -- paths --------------------------------------------------------------------------------

    @property
    def image_path(self) -> Path:
        """The image file inside the mount: every request to it goes through the rules."""
        return self.mountpoint / (self.name or self.backing.name)

    @property
    def control_path(self) -> Path:
        return self.mountpoint / client.CONTROL

    # -- commands -----------------------------------------------------------------------------

    def ctl(self, text: str) -> str:
        """Send control command(s) (one write: several lines apply all or nothing); return the
        daemon's answer. ControlError with the write's errno and the daemon's message."""
        return client.send(self.mountpoint, text)

    def status(self, rules: int | None = None) -> dict[str, Any]:
        """The status, exactly as `blkfuse status --json` prints it; `rules`: list only the
        first that many rules (0: none, for the rest of the status at once)."""
        return client.status(self.mountpoint, rules)

    def status_text(self) -> str:
        """The human status (what reading `control` shows)."""
        return client.read_status(self.mountpoint)

    def add_break(self, event: str, tag: str) -> None:
        """`break EVENT TAG`: suspend the next request that raises `event`."""
        self.ctl(f"break {shlex.quote(event)} {shlex.quote(tag)}")

    def wait_break(self, tag: str, timeout: float | None = None) -> None:
        """Block until a request is suspended at `tag` (ControlError ETIMEDOUT after
        `timeout` s; ENOENT at once if `tag` is neither a breakpoint nor suspended)."""
        extra = "" if timeout is None else f" {timeout:g}"
        self.ctl(f"wait_break {shlex.quote(tag)}{extra}")

    def wait_hit(self, rule_id: int, timeout: float | None = None, hits: int | None = None) -> int:
        """Block until rule `rule_id` has acted (failed a request, begun a delay, set a state)
        once more than when the wait began, or, if it is spent (once, count), at once: its
        last act has begun. `hits=N`: until it has N hits in all (at once if it has: read its
        hits, start the I/O, wait for hits + 1, and no act is missed). Returns its hit count
        then. ControlError ETIMEDOUT after `timeout` s; ENOENT for an unknown rule, or one
        spent before it could get there."""
        extra = "" if timeout is None else f" {timeout:g}"
        if hits is not None:
            extra += f" hits={int(hits)}"
        answer = self.ctl(f"wait_hit {int(rule_id)}{extra}")
        return int(answer.rsplit("hits=", 1)[1].split(")")[0])

    def resume(self, tag: str) -> None:
        """Let the request suspended at `tag` go on."""
        self.ctl(f"resume {shlex.quote(tag)}")

    def remove_break(self, tag: str) -> None:
        """Drop breakpoint `tag`, waking its request if one is suspended there."""
        self.ctl(f"remove_break {shlex.quote(tag)}")

    def mark(self, name: str) -> None:
        """`mark NAME`: a mark entry in the write log (-o log-writes=FILE), where `blkfuse
        replay --end-mark NAME` stops."""
        self.ctl(f"mark {shlex.quote(name)}")

    def inject_error(self, **keys: object) -> int:
        """Add an [inject-error] rule (the config file's keys: event=, errno=, sector=,
        once=True, iotype="write", state=...); returns its id."""
        return self._add_rule("inject-error", keys)

    def set_state(self, **keys: object) -> int:
        """Add a [set-state] rule (event=, state=, new_state=); returns its id."""
        return self._add_rule("set-state", keys)

    def _add_rule(self, kind: str, keys: Mapping[str, object]) -> int:
        answer = self.ctl(f"{kind} {_rule_keys(keys)}")
        m = re.search(r"added rule (\d+)", answer)
        if not m:
            raise ControlError(0, f"unexpected answer to {kind}: {answer.strip()!r}")
        return int(m.group(1))

    def remove(self, rule_id: int) -> None:
        """Remove rule `rule_id`."""
        self.ctl(f"remove {int(rule_id)}")

    def clear(self) -> None:
        """Remove every rule (breakpoints stay)."""
        self.ctl("clear")

    def state(self, n: int) -> None:
        """Set the current state to `n` (the `state` command)."""
        self.ctl(f"state {int(n)}")

    def reload(self) -> None:
        """Re-read the config file and options (every rule replaced, state back to 1)."""
        self.ctl("reload")

    def suspended(self) -> list[dict[str, Any]]:
        """The requests suspended now (tags, event, op, offset, length, seconds)."""
        result: list[dict[str, Any]] = self.status(rules=0)["suspended"]
        return result

    def powercut(
        self, keep: str = "none", seed: int | None = None, save: StrPath | None = None
    ) -> dict[str, Any]:
        """Cut the power (needs -o track-unsynced=on): the unsynced writes are lost as `keep`
        says (none, random, prefix; `seed` repeats a random or prefix cut on the same history),
        then every request fails with EIO until poweron(). `save`: a sparse copy of the image
        as the cut left it. Returns the cut (status "last_cut"): keep, seed, writes,
        writes_kept/torn/lost, size, "lost" and "torn" as [[offset, length], ...], saved."""
        words = [f"keep={keep}"]
        if seed is not None:
            words.append(f"seed={int(seed)}")
        if save is not None:
            words.append(f"save={shlex.quote(os.path.abspath(os.fspath(save)))}")
        answer = self.ctl("powercut " + " ".join(words))
        result: dict[str, Any] = json.loads(answer.strip().splitlines()[-1])
        return result

    def poweron(self, force: bool = False) -> None:
        """Bring the device back. ControlError EBUSY while a loop device or a process still
        holds the image (what it wrote before the cut could land after), unless `force`."""
        self.ctl("poweron force" if force else "poweron")

    @contextmanager
    def filesystem(
        self,
        fstype: str = "ext4",
        *,
        mountpoint: StrPath | None = None,
        mount_options: str | Sequence[str] | None = None,
        make: bool = True,
        **mkfs_options: object,
    ) -> Iterator[Path]:
        """A filesystem on a loop device (direct-io mode, checked) over this mount's image,
        for a `with` block that gets its mounted directory:

            with m.filesystem("ext4", b=4096, mount_options="noatime") as fs:
                (fs / "f").write_text("x")

        `fstype` is ext4, xfs or btrfs; `mkfs_options` are mkfs flags (a one-letter key is
        `-k VALUE`, a longer one `--key VALUE`, True the flag alone); `make=False` mounts
        the filesystem already on the image. `mountpoint` defaults to a temporary directory.
        Leaving always tears down in order (umount, losetup -d, the loop device gone), so
        the mount itself can then be unmounted; MountError names what could not go."""
        with fsstack.filesystem(
            self.image_path,
            fstype,
            mountpoint,
            make=make,
            mkfs_options=mkfs_options,
            mount_options=mount_options,
        ) as fs:
            yield fs.mountpoint

    def trace(self) -> client.TraceStream:
        """The trace, live, from the requests after this call: iterate it for one dict per
        image request as it finishes (time, op, offset, length, pid, comm, events, rules,
        errno, us, suspended_at; see blkfuse.trace); it ends when the mount goes, or
        close() it (it is a context manager). Iterate in another thread than the I/O's."""
        return client.TraceStream(self.mountpoint)


def mounts() -> Iterator[mounttab.Entry]:
    """Every blkfuse mount this process can see (live or with its daemon gone)."""
    return iter(mounttab.blkfuse_mounts())
