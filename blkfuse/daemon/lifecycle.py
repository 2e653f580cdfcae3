"""The mount's life: build the pieces, mount, tell the parent, serve, shut down in order.

    prepare(...) -> Mount   everything that can fail before mounting (rules, image, mountpoint)
    run_foreground(mount)   mounts and serves until shut down; returns the exit status
    run_background(mount)   forks; the child mounts and serves, the parent returns only once
                            the mount is live (or raises MountError with the one-line reason)

A Daemon's life is one State that only moves forward: STARTING (built, not mounted), SERVING,
STOPPING (shutdown under way), STOPPED (the FUSE loop told to end; serve() then fsyncs and
unmounts).

Shutdown (SIGTERM, SIGINT, SIGHUP, or the kernel ending the session): every suspended request
is resumed and every breakpoint dropped, pending `wait_break`s fail with ESHUTDOWN, open files
get GRACE_SECONDS to close (waited for on an event, not polled), the FUSE loop stops taking
requests and finishes the ones in flight, the backing file is fsynced, the mount is removed
(lazily, so open files cannot keep it), exit 0. `blkfuse umount` sends SIGTERM only once
nothing uses the image (or with --lazy).

Forced shutdown (SIGUSR1, what `blkfuse umount --force` sends): the same, except that from
that moment every new request on the image fails with EIO, as on a disk that was pulled, and
open files get no grace: the mount goes as soon as the requests in flight are answered.
"""

import enum
import errno
import logging
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field

from blkfuse import layout
from blkfuse.client import mounttab
from blkfuse.daemon import memory
from blkfuse.errors import MountError
from blkfuse.rules.model import Rule, Settings

log = logging.getLogger("blkfuse")

# A suspended request holds one pyfuse3 worker task until resumed; pyfuse3 starts a new worker
# only while below max_tasks, so this bounds how many requests can be suspended at once
# without blocking the others.
MAX_TASKS = 10000
# Idle pyfuse3 workers kept parked (pyfuse3's min_tasks). Under the hand-off loop a worker is
# needed each time a handler waits (a cold read, a delay, a breakpoint); a parked one costs a
# little memory, a new one a task spawn, which at queue depth 32 on a cold disk was a
# measurable share of the trio thread's time.
IDLE_TASKS = 64

# At shutdown, after every suspended request is released, the files still open (a writer that
# was just released closing its file, say) get this long to finish before the mount goes.
GRACE_SECONDS = 5.0


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORCE_SIGNAL = signal.SIGUSR1
_ALL_SIGNALS = SHUTDOWN_SIGNALS + (FORCE_SIGNAL,)
# Fires the cut armed by the control command powercut-arm (daemon/control.py): a signal is
# not queued in /dev/fuse behind the mount's requests as a control write is, so the cuts of
# several busy mounts land together (client/fleet.py).
ARM_SIGNAL = signal.SIGUSR2
_MASKED_SIGNALS = _ALL_SIGNALS + (ARM_SIGNAL,)


@dataclass
class Mount:
    image_path: str
    mountpoint: str
    name: str
    settings: Settings
    rules: list[Rule] = field(default_factory=list)
    read_only: bool = False
    allow_other: bool = False
    log_file: str | None = None
    trace_file: str | None = None


def _is_mountpoint(path: str) -> bool:
    return os.path.ismount(os.path.realpath(path)) or mounttab.is_mounted(path)


def prepare(
    image: str,
    mountpoint: str,
    settings: Settings,
    *,
    name: str | None = None,
    read_only: bool = False,
    allow_other: bool = False,
    log_file: str | None = None,
    trace_file: str | None = None,
) -> Mount:
    """Check everything and load the rules; MountError on the first problem."""
    from blkfuse.daemon.fs import missing_pyfuse3_features
    from blkfuse.rules import config

    missing = missing_pyfuse3_features()
    if missing:
        import pyfuse3

        raise MountError(
            f"pyfuse3 {pyfuse3.__version__} ({os.path.dirname(pyfuse3.__file__)}) "
            f"is not built with blkfuse's patch: no {', '.join(missing)}; "
            "run scripts/setup (see scripts/pyfuse3/README.md)"
        )
    try:
        rules = config.load_rules(settings)
    except config.ConfigError as e:
        raise MountError(str(e)) from None
    except OSError as e:
        raise MountError(f"{e.filename or settings.config_path}: {e.strerror}") from None

    image_path = os.path.abspath(image)
    if not os.path.exists(image_path):
        raise MountError(f"{image}: no such image file")
    if os.path.isdir(image_path):
        raise MountError(f"{image}: is a directory, not an image file")
    if not os.access(image_path, os.R_OK if read_only else os.R_OK | os.W_OK):
        raise MountError(
            f"{image}: permission denied" + ("" if read_only else " (try --read-only)")
        )

    mnt = os.path.abspath(mountpoint)
    try:
        os.stat(mnt)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"{mountpoint}: a dead FUSE mount is there (run: blkfuse umount {mountpoint})"
            ) from None
    if not os.path.exists(mnt):
        raise MountError(f"{mountpoint}: mountpoint does not exist")
    if not os.path.isdir(mnt):
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    if _is_mountpoint(mnt):
        raise MountError(f"{mountpoint}: already mounted there: {_mounted_there(mnt)}")
    if not settings.nonempty:
        _refuse_nonempty(mountpoint, mnt)
    if os.path.realpath(image_path).startswith(os.path.realpath(mnt) + os.sep):
        raise MountError(f"{image}: the image must not be inside the mountpoint")
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse does not exist (load the fuse module, or give the "
            "container --device /dev/fuse)"
        )
    if log_file:
        log_file = _writable(log_file, "log")
    if trace_file:
        trace_file = _writable(trace_file, "trace")

    if name is None:
        name = os.path.basename(image_path)
    problem = layout.image_name_problem(name)
    if problem:
        raise MountError(f"invalid image name {name!r}: {problem}")
    return Mount(
        image_path=image_path,
        mountpoint=mnt,
        name=name,
        settings=settings,
        rules=rules,
        read_only=read_only,
        allow_other=allow_other,
        log_file=log_file,
        trace_file=trace_file,
    )


def _mounted_there(mnt: str, timeout: float = 2.0) -> str:
    """What is mounted at `mnt`, in words, as the lock conflict names a holder: 'the blkfuse
    mount of /img/disk.img (daemon pid 12); unmount it first (blkfuse umount /mnt/a)', 'an
    ext4 file system (/dev/loop0)'. A blkfuse mount is asked for its status text (in a thread:
    a wedged daemon must not hang the mount that asks)."""
    import threading

    entry = mounttab.find(mnt)
    if entry is None:  # ismount says so, the table does not (another mount namespace)
        return "something"
    if not entry.is_blkfuse:
        return f"a {entry.fstype} file system ({entry.source})"
    found: dict[str, str] = {}

    def ask() -> None:
        try:
            with open(layout.control_path(mnt), encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.startswith("image: "):  # "image: PATH (cache=..., ...)"
                        found["image"] = re.sub(r" \(cache=[^)]*\)$", "", line[7:])
                    match = re.match(r"mount: .* \(daemon pid (\d+)\)$", line)
                    if match:
                        found["pid"] = match.group(1)
                        return
        except OSError as e:
            found["error"] = e.strerror or str(e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    umount = f"unmount it first (blkfuse umount {mnt})"
    if "pid" in found:
        image = found.get("image", "an image")
        return f"the blkfuse mount of {image} (daemon pid {found['pid']}); {umount}"
    if "error" in found:
        return f"a blkfuse mount whose status cannot be read ({found['error']}); {umount}"
    return f"a blkfuse mount whose daemon does not answer; {umount}"


def _writable(path: str, what: str) -> str:
    """`path` made absolute, once it is known that the daemon can write its `what` there."""
    path = os.path.abspath(path)
    try:
        open(path, "a").close()
    except OSError as e:
        raise MountError(f"{path}: cannot write the {what}: {e.strerror}") from None
    return path


def _refuse_nonempty(mountpoint: str, mnt: str) -> None:
    """Mounting over entries hides them until the unmount; say so instead (-o nonempty)."""
    try:
        entries = sorted(os.listdir(mnt))
    except OSError:
        return  # unreadable to us: the kernel decides
    if entries:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise MountError(
            f"{mountpoint}: mountpoint is not empty ({entries[0]!r}{more}); "
            "the mount would hide it (-o nonempty to mount anyway)"
        )


def _lock_image(m: "Mount", fd: int) -> None:
    """QEMU's locking=on on the open image; MountError naming the holder on a conflict."""
    from blkfuse.block import lock

    try:
        lock.acquire(fd, read_only=m.read_only, growable=m.settings.growable)
    except lock.LockConflict as e:
        raise MountError(
            f"{m.image_path}: in use by {lock_holder(m.image_path)}: its lock "
            f'{e.theirs} "{lock.PERM_NAMES[e.perm]}" (QEMU\'s locking=on; '
            "-o locking=off to mount anyway)"
        ) from None
    except OSError as e:
        raise MountError(
            f"{m.image_path}: cannot lock it ({e.strerror}; -o locking=off to "
            "mount without the lock)"
        ) from None


def lock_holder(image_path: str) -> str:
    """Who holds the image: 'the blkfuse mount at /mnt/a (pid 12)', 'pid 7 (qemu-system-x86)'.

    An OFD lock does not say (F_OFD_GETLK answers pid -1): the holder is one of the processes
    that have the image open (holders.py), and a blkfuse daemon among them is named by its
    mountpoint, which its status gives.
    """
    from blkfuse.client import holders

    path = os.path.realpath(image_path)
    try:
        st = os.stat(path)
    except OSError:
        return "another process"
    found = holders.find(path, st.st_dev, st.st_ino)
    daemons = _blkfuse_daemons()
    names = [
        f"the blkfuse mount at {daemons[pid]} (pid {pid})"
        if pid in daemons
        else f"pid {pid} ({comm})"
        for pid, comm in found.processes
    ]
    names += [f"loop device {dev}" for dev in found.loops]
    if not names:
        return "another process (one we may not inspect)" if found.unreadable else "another process"
    return " or ".join(names) if len(names) <= 3 else ", ".join(names[:3]) + ", ..."


def _blkfuse_daemons(timeout: float = 2.0) -> dict[int, str]:
    """{daemon pid: mountpoint} of the blkfuse mounts here, read from their status text
    (each in a thread: a wedged daemon must not hang the mount that asks)."""
    import threading

    found: dict[int, str] = {}

    def ask(mnt: str) -> None:
        try:
            with open(layout.control_path(mnt), encoding="utf-8", errors="replace") as f:
                for line in f:
                    match = re.match(r"mount: .* \(daemon pid (\d+)\)$", line.rstrip("\n"))
                    if match:
                        found[int(match.group(1))] = mnt
                        return
        except OSError:
            pass

    threads = [
        threading.Thread(target=ask, args=(mnt,), daemon=True)
        for mnt in (e.mountpoint for e in mounttab.blkfuse_mounts())
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return dict(found)


class State(enum.Enum):
    """Where a Daemon is in its life; it only moves forward, in this order."""

    STARTING = "starting"  # built, not mounted
    SERVING = "serving"  # mounted, answering requests
    STOPPING = "stopping"  # control closed, suspended requests resumed, open files' grace
    STOPPED = "stopped"  # the FUSE loop told to end: it answers what is in flight, returns


class Daemon:
    """One mounted filesystem: engine, image, block device, control, FUSE operations."""

    def __init__(self, m: Mount):
        from blkfuse.block.device import BlockDevice
        from blkfuse.block.stack import build_stack, open_image
        from blkfuse.daemon.control import Control
        from blkfuse.daemon.fs import Operations
        from blkfuse.daemon.fuseloop import DEFAULT_POLL_US
        from blkfuse.daemon.trace import TracedBlock, Tracer
        from blkfuse.engine.core import Engine
        from blkfuse.rules import config, profiles

        self.m = m
        settings = m.settings
        qemu = profiles.profile(settings.qemu)  # whose blkdebug and block layer
        self.engine = Engine(m.rules, seed=settings.seed, profile=qemu)
        self.image = open_image(m.image_path, settings, read_only=m.read_only)
        if settings.locking:
            try:
                _lock_image(m, self.image.fd)
            except MountError:
                self.image.close()
                raise
        try:
            self.stack = build_stack(settings, self.image)
        except (OSError, ValueError) as error:  # the log-writes file (a LogFormatError too)
            self.image.close()
            where = settings.log_writes or m.image_path
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise MountError(f"option log-writes: {where}: {reason}") from None
        # -o poll-us wins; BLKFUSE_POLL_US changes the default (A/B runs, the test suite's
        # second pass with polling off).
        self.poll_us: int = DEFAULT_POLL_US if settings.poll_us is None else settings.poll_us
        if settings.poll_us is None:
            try:
                self.poll_us = max(0, int(os.environ.get("BLKFUSE_POLL_US", DEFAULT_POLL_US)))
            except ValueError:
                log.warning("BLKFUSE_POLL_US is not a number; polling for %d us", DEFAULT_POLL_US)
                self.poll_us = DEFAULT_POLL_US
        self.block = BlockDevice.from_settings(self.engine, self.stack, settings)
        if os.environ.get("BLKFUSE_LEAN", "1") == "0":  # every request the full way (A/B runs)
            self.block.lean_off()
        self.tracer = Tracer(self.engine, m.trace_file)
        info = {
            "image": m.image_path,
            "name": m.name,
            "mountpoint": m.mountpoint,
            "config": settings.config_path,
            "cache": settings.cache,
            "format": settings.format,
            "align": settings.align,
            "max_transfer": settings.max_transfer,
            "opt_write_zero": settings.opt_write_zero,
            "max_write_zero": settings.max_write_zero,
            "opt_discard": settings.opt_discard,
            "max_discard": settings.max_discard,
            "read_only": m.read_only,
            "growable": settings.growable,
            "locking": settings.locking,
            "qemu": settings.qemu,
            "io": self.image.io_mode,
            "io_uring": self.image.uses_uring,
            "io_threads": self.image.io_threads,
            "poll_us": self.poll_us,
        }
        if settings.log_writes is not None:
            info["log_writes"] = settings.log_writes
        undo = self.stack.undo
        if undo is not None:
            info["track_unsynced"] = True
            info["unsynced_cap"] = undo.log.cap
            info["atomic"] = undo.log.atomic
        self.control = Control(
            self.engine,
            reload=lambda: config.load_rules(settings),
            info=info,
            block=self.block,
            tracer=self.tracer,
            settings=settings,
        )
        memory.give_back()  # the parser's scratch memory, before serving for hours
        self.ops = Operations(
            self.block, self.control, name=m.name, read_only=m.read_only, growable=settings.growable
        )
        # The FUSE layer holds the traced device only while tracing is on: free when off.
        traced = TracedBlock(self.block, self.tracer)
        self.tracer.on_switch = lambda on: setattr(self.ops, "block", traced if on else self.block)
        self.tracer.on_switch(self.tracer.active)
        self.state = State.STARTING

    def mount(self) -> None:
        """Mount (pyfuse3.init). MountError with the kernel's or libfuse's reason on failure."""
        import pyfuse3

        # default_permissions (among pyfuse3's defaults): the kernel checks the modes fs.py
        # reports, the backing file's for the image, so --allow-other grants no one more
        # than the backing file does.
        options = set(pyfuse3.default_options) | {"default_permissions"}
        options |= {"fsname=blkfuse", "subtype=blkfuse"}
        if self.m.allow_other:
            options.add("allow_other")
        # No "ro" mount option for --read-only: it would close `control` to writes too.
        # The image's opens for writing fail with EROFS in fs.py instead.
        # From the moment the mount exists until the trio loop listens for them, a shutdown
        # signal must wait, not kill the daemon and leave a dead mount behind.
        signal.pthread_sigmask(signal.SIG_BLOCK, _MASKED_SIGNALS)
        # libfuse reports why a mount failed on stderr; catch it for the one-line reason.
        with tempfile.TemporaryFile() as err:
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                pyfuse3.init(self.ops, self.m.mountpoint, options)
            except Exception as e:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _MASKED_SIGNALS)
                os.dup2(saved, 2)
                err.seek(0)
                why = err.read().decode(errors="replace").strip().splitlines()
                reason = why[-1] if why else str(e)
                raise MountError(f"cannot mount on {self.m.mountpoint}: {reason}") from None
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        self.state = State.SERVING

    async def _main(self) -> None:
        import pyfuse3
        import trio

        # handoff (the patch's request loop): a worker reads on while handlers do not
        # wait; "0" is pyfuse3's locked loop, a task switch per request (A/B runs)
        handoff = os.environ.get("BLKFUSE_HANDOFF", "1") != "0"
        if os.environ.get("BLKFUSE_FASTLOOP", "1") != "0":  # "0": pyfuse3's own waits, for A/B runs
            from blkfuse.daemon import fuseloop

            loop = fuseloop.install(self.poll_us, handoff=handoff)
            self.image.loop_idle = loop.idle
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._watch_arm_signal)
            await pyfuse3.main(min_tasks=IDLE_TASKS, max_tasks=MAX_TASKS, handoff=handoff)
            # The loop ended: by our shutdown, or the kernel ended the session (unmounted).
            self._stop()
            nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        import trio

        with trio.open_signal_receiver(*_ALL_SIGNALS) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALL_SIGNALS)
            async for signum in signals:
                forced = signum == FORCE_SIGNAL
                log.info(
                    "%s: %s",
                    signal.Signals(signum).name,
                    "forced shutdown" if forced else "shutting down",
                )
                if forced and self.state is not State.STOPPED:
                    # Also during an orderly shutdown's grace: --force cuts it short.
                    self.ops.refuse(errno.EIO)
                if self.state is State.SERVING:
                    self._release()
                    self._nursery.start_soon(self._grace_then_stop)
                # Later signals are absorbed: the shutdown under way finishes in order.

    async def _watch_arm_signal(self) -> None:
        """ARM_SIGNAL fires the armed powercut, here, in this task's turn: its own receiver,
        so a cut's revert and fsync never delay a shutdown signal's handling."""
        import trio

        with trio.open_signal_receiver(ARM_SIGNAL) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (ARM_SIGNAL,))
            async for _ in signals:
                if self.state is not State.SERVING:
                    log.warning("SIGUSR2: the mount is shutting down: no cut")
                elif not await self.control.fire_armed():
                    log.warning("SIGUSR2: no powercut armed (powercut-arm): ignored")

    def _release(self) -> None:
        """Shutdown's first step, once (SERVING -> STOPPING): control takes no more commands
        (pending waits fail with ESHUTDOWN), every breakpoint goes, every suspended request
        resumes. Trio thread only."""
        if self.state is State.SERVING:
            self.state = State.STOPPING
            self.control.close()
            self.engine.resume_all()
            self.block.holds.end_all()  # delay rules' holds end now

    async def _grace_then_stop(self) -> None:
        """Let in-flight requests and open files finish (GRACE_SECONDS at most; after a forced
        shutdown only the requests), then stop the FUSE loop."""
        import trio

        with trio.move_on_after(GRACE_SECONDS):
            await self.ops.wait_settled()
        if not self.ops.settled():
            log.warning(
                "shutting down with %d request(s) in flight and files still open", self.ops.inflight
            )
        self._stop()

    def _stop(self) -> None:
        """Shutdown's last step, once (-> STOPPED): the FUSE loop takes no new requests;
        pyfuse3.main() returns once those in flight are answered. Trio thread only."""
        self._release()
        if self.state is State.STOPPING:
            self.state = State.STOPPED
            import pyfuse3

            pyfuse3.terminate()

    def serve(self) -> int:
        """Run until shut down; then flush, unmount. Returns the exit status."""
        import pyfuse3
        import trio

        status = 0
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("the FUSE loop failed")
            status = 1
        finally:
            try:
                self.image.fsync_now()
            except OSError as e:
                log.error("fsync of %s failed: %s", self.m.image_path, e)
                status = 1
            # The filters, then the image, before the unmount: once the mount is gone, a
            # write log (-o log-writes) is complete, its last flush and superblock written.
            try:
                self.stack.close()
            except OSError:
                pass
            if self.state is not State.STARTING:
                pyfuse3.close(unmount=True)
            self.tracer.close()
        log.info("unmounted %s", self.m.mountpoint)
        return status


def _setup_logging(log_file: str | None, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    h: logging.Handler
    if log_file:
        h = logging.FileHandler(log_file)
    elif foreground:
        h = logging.StreamHandler(sys.stderr)
    else:
        h = logging.NullHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.INFO)


def run_foreground(m: Mount) -> int:
    _setup_logging(m.log_file, foreground=True)
    d = Daemon(m)
    d.mount()
    log.info("mounted %s on %s", m.image_path, m.mountpoint)
    return d.serve()


def run_background(m: Mount) -> None:
    """Fork; the child mounts and serves. Returns in the parent once the mount is live;
    raises MountError there if it is not. Never returns in the child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:  # parent: wait for "ok" or the reason
        os.close(w)
        chunks = []
        while True:
            b = os.read(r, 4096)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        msg = b"".join(chunks).decode(errors="replace").strip()
        if msg == "ok":
            return
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise MountError(msg or "the daemon died before the mount was ready")

    # child
    os.close(r)
    status = 1
    try:
        os.setsid()
        _setup_logging(m.log_file, foreground=False)
        try:
            d = Daemon(m)
            d.mount()
        except MountError as e:
            os.write(w, f"{e}\n".encode())
            os._exit(1)
        except OSError as e:
            os.write(w, f"{e.filename or m.image_path}: {e.strerror}\n".encode())
            os._exit(1)
        except Exception as e:
            os.write(w, f"{type(e).__name__}: {e}\n".encode())
            os._exit(1)
        # Detach: nothing of the caller's (terminal, pipes, cwd) stays held.
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
        log.info("mounted %s on %s (pid %d)", m.image_path, m.mountpoint, os.getpid())
        os.write(w, b"ok\n")
        os.close(w)
        status = d.serve()
    except BaseException:
        log.exception("daemon failed")
    finally:
        logging.shutdown()
        os._exit(status)
