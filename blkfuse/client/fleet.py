"""Several mounts, one command: correlated faults across the disks of a cluster.

    from blkfuse import Fleet

    fleet = Fleet([m1, m2, m3])                 # Mounts or mountpoints, in node order
    cut = fleet.powercut(keep="random", seed=7) # every node at once
    print(cut.text())                           # each node's answer and seed, the spread
    fleet.poweron()

Shared by `blkfuse ctl MNT1 MNT2 ... -- COMMAND` and the Python API, so both send the same
way and derive the same seeds.

How a command reaches several mounts: every control file is opened first (a mount that
cannot be opened fails its node, the others still get the command); then one thread per
node, each already holding its open file, waits at a barrier and writes the command the
moment the barrier opens, so the writes go out together rather than one round trip after
another (a write to `control` returns only once the daemon has run the command: a cut with
its revert and fsync takes milliseconds). The answers are then collected; a node whose
daemon does not answer within `timeout` seconds fails with ETIMEDOUT.

Seeds: a `powercut` line sent to a fleet is given one fleet seed (the line's `seed=N`, or
one picked at random); node i (0-based, in fleet order) cuts with `node_seed(N, i)`: the
first 4 bytes, big-endian, of SHA-256 of the ASCII text "N:i" (for seed 7, node 0:
`printf 7:0 | sha256sum | cut -c1-8` in hex). Each node's answer names the seed it used, so
one node's cut replays alone with `blkfuse ctl MNT powercut keep=K seed=S`. The node index is
the position in the whole fleet, so a subset cut (nodes=) gives a node the same seed as a
cut of all.

How a powercut reaches several mounts (`via`): a control write is a FUSE request, queued
in /dev/fuse behind the mount's own I/O and run by the same loop, so on busy mounts the
written cuts land milliseconds apart. By default ("fifo") the fleet arms every node through
its control file (`powercut-arm ... fifo=PATH`: checked and acknowledged like any command;
if any node refuses, the armed ones are disarmed and none is cut), then writes one byte to
that FIFO: the kernel wakes every daemon in that one call, and each cuts from its own watch
task, not behind its queue. "signal" arms the same way and sends SIGUSR2 to each daemon
(N calls; the sender can lose the CPU to a daemon it woke); "write" writes the powercut
line as any other command. Either armed way then reads each cut's answer with
`powercut-wait`, the same text a written powercut answers. scripts/bench-spread measures
the three.

The spread: each daemon stamps the moment its power goes off (CLOCK_MONOTONIC, and
CLOCK_REALTIME for comparing machines; status JSON "power_off_at"). After a fan-out cut the
fleet reads every cut node's stamp and reports max - min of the monotonic stamps (all mounts
of one machine share that clock), and the spread of the moments its threads issued the
writes, which bounds what the client side contributes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blkfuse import client
from blkfuse.errors import ControlError

if TYPE_CHECKING:
    from blkfuse.client.api import Mount

StrPath = str | os.PathLike[str]

# A fleet command waits this long for each daemon's answer (a cut reverts and fsyncs).
FLEET_SECONDS = 60.0

# How a fleet powercut reaches the daemons (module doc): armed then fired by ARM_SIGNAL
# (daemon/lifecycle.py), or the powercut line written to every control file.
VIAS = ("signal", "fifo", "write")
ARM_SIGNAL = signal.SIGUSR2
ISSUED = {"signal": "signals sent", "fifo": "the FIFO written", "write": "writes issued"}


def node_seed(seed: int, index: int) -> int:
    """The powercut seed of node `index` in a fleet cut with `seed` (see the module doc)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _powercut_seed(words: list[str]) -> tuple[int, list[str]] | None:
    """A powercut line's fleet seed (given or picked) and its other words; None if the
    line's seed is not a plain number (then it goes out as written, for the daemon to
    refuse with its own message)."""
    rest = [w for w in words[1:] if not w.startswith("seed=")]
    given = [w.removeprefix("seed=") for w in words[1:] if w.startswith("seed=")]
    if not given:
        return secrets.randbits(32), rest
    if len(given) == 1 and given[0].isdigit():
        return int(given[0]), rest
    return None


def per_node_commands(text: str, count: int) -> tuple[list[str], int | None, list[int | None]]:
    """The text each of `count` nodes is sent, the fleet seed (None: no powercut line) and
    each node's powercut seed. Lines other than `powercut` go to every node unchanged.
    A powercut's `save=PATH` must hold `{node}` (replaced by each node's index) when the
    fleet has several nodes: ValueError otherwise, before anything is sent."""
    texts = [[] for _ in range(count)]  # type: list[list[str]]
    fleet_seed: int | None = None
    for line in text.splitlines() or [text]:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = []  # the daemon names the quoting problem
        seeded = _powercut_seed(words) if words[:1] in (["powercut"], ["powercut-arm"]) else None
        if seeded is None:
            for lines in texts:
                lines.append(line)
            continue
        if fleet_seed is None:
            fleet_seed = seeded[0]
        saves = [w for w in seeded[1] if w.startswith("save=")]
        if count > 1 and any("{node}" not in w for w in saves):
            raise ValueError(
                f"{saves[0]}: every node would save its image there; put {{node}} in the path "
                "for the node's index (save=/var/tmp/cut-{node}.img)"
            )
        for i, lines in enumerate(texts):
            rest = [w.replace("{node}", str(i)) if w.startswith("save=") else w for w in seeded[1]]
            lines.append(shlex.join([words[0], *rest, f"seed={node_seed(fleet_seed, i)}"]))
    seeds: list[int | None] = [
        None if fleet_seed is None else node_seed(fleet_seed, i) for i in range(count)
    ]
    return ["\n".join(lines) for lines in texts], fleet_seed, seeds


@dataclass
class NodeResult:
    """One node's part of a fleet command."""

    index: int  # its position in the fleet
    mountpoint: str
    command: str  # what it was sent
    answer: str | None = None  # the daemon's answer, if the command succeeded
    error: ControlError | None = None
    seed: int | None = None  # powercut: the seed this node cut with
    power_off_at: dict[str, int] | None = None  # powercut: the daemon's stamp
    cut: dict[str, Any] | None = None  # powercut: the answer's JSON line, when it has one
    issued_ns: int | None = None  # CLOCK_MONOTONIC when its thread wrote the command

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "mountpoint": self.mountpoint,
            "command": self.command,
            "ok": self.ok,
            "answer": self.answer,
            "errno": None if self.error is None else self.error.errno_name,
            "error": None if self.error is None else self.error.message,
            "seed": self.seed,
            "power_off_at": self.power_off_at,
            "issued_ns": self.issued_ns,
            "cut": self.cut,
        }


@dataclass
class FleetResult:
    """A fleet command's outcome: one NodeResult per node it was sent to (fleet order)."""

    command: str
    nodes: list[NodeResult]
    seed: int | None = None  # the fleet seed of a powercut
    spread_ns: int | None = None  # max - min of the cut nodes' power-off stamps
    issue_spread_ns: int | None = None  # max - min of the moments the writes were issued
    via: str | None = None  # a powercut: "signal" (armed, then fired) or "write" (module doc)

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes)

    @property
    def failed(self) -> list[NodeResult]:
        return [n for n in self.nodes if not n.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "ok": self.ok,
            "seed": self.seed,
            "spread_ns": self.spread_ns,
            "issue_spread_ns": self.issue_spread_ns,
            "via": self.via,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def text(self) -> str:
        """What `blkfuse ctl MNT1 MNT2 ... -- COMMAND` prints."""
        out = []
        if self.seed is not None:
            out.append(
                f"fleet seed {self.seed}: node i cut with the seed derived from {self.seed} "
                "and i (each answer names it)"
            )
        for n in self.nodes:
            if n.ok:
                lines = (n.answer or "").rstrip("\n").splitlines()
                if n.cut is not None:
                    lines = lines[:-1]  # the JSON line: in --json as "cut"
                out.append(f"{n.mountpoint}: " + ("\n".join(lines) or "ok"))
            else:
                assert n.error is not None
                out.append(f"{n.mountpoint}: FAILED: {n.error.message} [{n.error.errno_name}]")
        if self.spread_ns is not None:
            cut = sum(1 for n in self.nodes if n.power_off_at is not None)
            issue = (
                ""
                if self.issue_spread_ns is None
                else (f", {ISSUED[self.via or 'write']} within {self.issue_spread_ns / 1e6:.3f} ms")
            )
            out.append(
                f"spread: the {cut} cuts landed within {self.spread_ns / 1e6:.3f} ms "
                f"(CLOCK_MONOTONIC){issue}"
            )
        return "\n".join(out) + "\n"

    def raise_for_failure(self) -> None:
        """FleetError naming every failed node, if any failed."""
        if self.failed:
            raise FleetError(self)


class FleetError(ControlError):
    """A fleet command failed on some node(s); `.result` holds every node's outcome (the
    others did run it). `.errno` is the first failure's."""

    def __init__(self, result: FleetResult) -> None:
        failed = result.failed
        first = failed[0].error
        assert first is not None
        message = "; ".join(
            f"{n.mountpoint}: {n.error.message} [{n.error.errno_name}]"
            for n in failed
            if n.error is not None
        )
        super().__init__(first.errno, message)
        self.result = result


def fan_out(
    mountpoints: Sequence[str], texts: Sequence[str], timeout: float = FLEET_SECONDS
) -> list[tuple[str | None, ControlError | None, int | None]]:
    """Send texts[i] to mountpoints[i], all at once (module doc): per node (answer, error,
    the CLOCK_MONOTONIC ns its write was issued)."""
    results: list[tuple[str | None, ControlError | None, int | None]] = [
        (None, None, None) for _ in mountpoints
    ]
    fds: dict[int, int] = {}
    for i, mnt in enumerate(mountpoints):
        try:
            fds[i] = client.open_control(mnt)
        except ControlError as e:
            results[i] = (None, e, None)
    barrier = threading.Barrier(len(fds) + 1)

    def node(i: int, fd: int) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        issued = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            results[i] = (client.exchange(fd, texts[i]), None, issued)
        except ControlError as e:
            results[i] = (None, e, issued)

    threads = {i: threading.Thread(target=node, args=(i, fd), daemon=True) for i, fd in fds.items()}
    for t in threads.values():
        t.start()
    barrier.wait()
    deadline = time.monotonic() + timeout
    wedged = set()
    for i, t in threads.items():
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            wedged.add(i)
            results[i] = (
                None,
                ControlError(errno.ETIMEDOUT, f"no answer within {timeout:g} s"),
                None,
            )
    for i, fd in fds.items():
        # A wedged node's thread still uses its fd: it is left open (closed with the
        # process) rather than recycled under that thread's feet.
        if i not in wedged:
            os.close(fd)
    return results


def _power_off_at(mountpoint: str, timeout: float) -> dict[str, int] | None:
    try:
        st = client.with_timeout(lambda: client.status(mountpoint, rules=0), timeout)
    except (ControlError, client.NoAnswer, ValueError):
        return None
    stamp = st.get("power_off_at")
    return stamp if isinstance(stamp, dict) else None


def cut_report(answer: str) -> dict[str, Any] | None:
    """The JSON line a powercut answer ends with (what it lost and tore), if it has one."""
    lines = answer.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        return None
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def armed_texts(texts: Sequence[str]) -> list[str] | None:
    """Each node's text as a `powercut-arm` line, if each is one `powercut` line and nothing
    else (what the signal way can fire); None otherwise."""
    armed = []
    for text in texts:
        try:
            lines = [shlex.split(line, comments=True) for line in text.splitlines()]
        except ValueError:
            return None
        words = [w for w in lines if w]
        if len(words) != 1 or words[0][0] != "powercut":
            return None
        armed.append(shlex.join(["powercut-arm", *words[0][1:]]))
    return armed


def _daemon_pid(mountpoint: str, timeout: float) -> int:
    """The pid of the daemon serving `mountpoint`, which this process can signal."""
    try:
        st = client.with_timeout(lambda: client.status(mountpoint, rules=0), timeout)
    except client.NoAnswer:
        raise ControlError(errno.ETIMEDOUT, f"no status within {timeout:g} s") from None
    except ValueError as e:
        raise ControlError(errno.EIO, f"unreadable status: {e}") from None
    pid = st.get("info", {}).get("pid")
    if not isinstance(pid, int):
        raise ControlError(errno.EIO, "the status names no daemon pid")
    try:
        os.kill(pid, 0)
    except OSError as e:
        raise ControlError(
            e.errno or errno.ESRCH,
            f"cannot signal the daemon (pid {pid}): {e.strerror}; cut with --via write "
            "(via='write') when the daemon runs in another pid namespace",
        ) from None
    return pid


def signal_cut(
    mountpoints: Sequence[str],
    arms: Sequence[str],
    timeout: float = FLEET_SECONDS,
    fifo: bool = False,
) -> list[tuple[str | None, ControlError | None, int | None]]:
    """Cut every mount by arming it through its control file (`arms[i]`, powercut-arm
    lines) and then firing all the armed cuts with ARM_SIGNAL, back to back: a signal does
    not wait in /dev/fuse behind the mount's own requests as a control write does, so the
    cuts of busy mounts land together. If any node cannot be armed, the armed ones are
    disarmed and none is cut. Per node (answer, error, CLOCK_MONOTONIC ns of its signal);
    the answer is the cut's, as powercut's (read back with powercut-wait).

    fifo=True: every daemon is armed on one FIFO (powercut-arm fifo=, in a directory made
    for the cut) and one write to it fires them all: the kernel wakes every daemon in that
    one call, where N signals are N calls, between which the sender can lose the CPU to
    the daemon it just woke."""
    with tempfile.TemporaryDirectory(prefix="blkfuse-cut-") as scratch:
        trigger = None
        if fifo:
            os.chmod(scratch, 0o755)  # the daemons open the FIFO, whoever they run as
            trigger = os.path.join(scratch, "fire")
            os.mkfifo(trigger, 0o644)
            arms = [f"{arm} {shlex.quote('fifo=' + trigger)}" for arm in arms]
        return _armed_cut(mountpoints, arms, timeout, trigger)


def _armed_cut(
    mountpoints: Sequence[str], arms: Sequence[str], timeout: float, trigger: str | None
) -> list[tuple[str | None, ControlError | None, int | None]]:
    results: list[tuple[str | None, ControlError | None, int | None]] = [
        (None, None, None) for _ in mountpoints
    ]
    pids: dict[int, int | None] = {}
    for i, mnt in enumerate(mountpoints):
        try:  # a FIFO reaches the daemon without its pid (from another pid namespace, say)
            pids[i] = _daemon_pid(mnt, timeout) if trigger is None else None
        except ControlError as e:
            results[i] = (None, e, None)
    chosen = sorted(pids)
    armed = fan_out([mountpoints[i] for i in chosen], [arms[i] for i in chosen], timeout)
    for i, (_, error, _) in zip(chosen, armed, strict=True):
        if error is not None:
            results[i] = (None, error, None)
    failed = [i for i, r in enumerate(results) if r[1] is not None]
    if failed:
        ready = [i for i in chosen if results[i][1] is None]
        fan_out([mountpoints[i] for i in ready], ["powercut-disarm"] * len(ready), timeout)
        why = ", ".join(f"node {i}" for i in failed)
        for i in ready:
            results[i] = (
                None,
                ControlError(errno.ECANCELED, f"not cut: {why} could not be armed (disarmed)"),
                None,
            )
        return results
    issued: dict[int, int] = {}
    if trigger is not None:
        # the daemons hold its read end: this open does not block, the write wakes them all
        fd = os.open(trigger, os.O_WRONLY | os.O_NONBLOCK)
        try:
            at = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            os.write(fd, b"!")
        finally:
            os.close(fd)
        issued = dict.fromkeys(chosen, at)
    for i in chosen if trigger is None else ():
        pid = pids[i]
        assert pid is not None
        issued[i] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            os.kill(pid, ARM_SIGNAL)
        except OSError as e:
            results[i] = (None, ControlError(e.errno or errno.ESRCH, f"signal: {e}"), issued[i])
    fired = [i for i in chosen if results[i][1] is None]
    answers = fan_out(
        [mountpoints[i] for i in fired], [f"powercut-wait {timeout:g}"] * len(fired), timeout
    )
    for i, (answer, error, _) in zip(fired, answers, strict=True):
        results[i] = (answer, error, issued[i])
    return results


def send_to(
    mountpoints: Sequence[StrPath],
    text: str,
    indexes: Sequence[int] | None = None,
    timeout: float = FLEET_SECONDS,
    via: str = "fifo",
) -> FleetResult:
    """Send `text` to the nodes `indexes` (default all) of the fleet `mountpoints` at once.

    A `powercut` line gets a fleet seed and a seed per node (module doc); after a cut every
    cut node's power-off stamp is read and the spread computed. A text that is one
    `powercut` line is cut `via` "fifo" or "signal" (armed, then fired: signal_cut) or
    "write" (the line written to every control file at once); other texts are written. Never raises for a node's failure: see
    FleetResult.ok / raise_for_failure.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")
    mnts = [os.fspath(m) for m in mountpoints]
    chosen = list(range(len(mnts))) if indexes is None else list(indexes)
    texts, fleet_seed, seeds = per_node_commands(text, len(mnts))
    arms = armed_texts([texts[i] for i in chosen]) if via != "write" else None
    if arms is not None:
        answers = signal_cut([mnts[i] for i in chosen], arms, timeout, fifo=via == "fifo")
    else:
        answers = fan_out([mnts[i] for i in chosen], [texts[i] for i in chosen], timeout)
    nodes = []
    for i, (answer, error, issued) in zip(chosen, answers, strict=True):
        nodes.append(
            NodeResult(
                index=i,
                mountpoint=mnts[i],
                command=texts[i],
                answer=answer,
                error=error,
                seed=seeds[i],
                issued_ns=issued,
            )
        )
    result = FleetResult(command=text, nodes=nodes, seed=fleet_seed)
    if fleet_seed is not None:
        result.via = via if arms is not None else "write"
    if fleet_seed is not None:
        for n in nodes:
            if n.ok:
                n.power_off_at = _power_off_at(n.mountpoint, timeout)
                n.cut = cut_report(n.answer or "")
        stamps = [n.power_off_at["monotonic_ns"] for n in nodes if n.power_off_at]
        if stamps:
            result.spread_ns = max(stamps) - min(stamps)
        issued_at = [n.issued_ns for n in nodes if n.issued_ns is not None]
        if issued_at:
            result.issue_spread_ns = max(issued_at) - min(issued_at)
    return result


class Fleet:
    """Several blkfuse mounts driven as one: the disks of a cluster's nodes.

    `mounts` are blkfuse.Mount objects or mountpoints, in node order (the order gives each
    node its index, hence its powercut seed). Commands go to every node at once (or to
    `nodes`: indexes, Mounts or mountpoints) and return a FleetResult with one NodeResult
    per node; with check=True (the default) a failure on any node raises FleetError, whose
    `.result` still says what every node did.
    """

    def __init__(self, mounts: Iterable[Mount | StrPath], timeout: float = FLEET_SECONDS):
        self.mountpoints = [_mountpoint(m) for m in mounts]
        if not self.mountpoints:
            raise ValueError("a Fleet needs at least one mount")
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.mountpoints)

    def __repr__(self) -> str:
        return f"<blkfuse.Fleet of {len(self)}: {' '.join(self.mountpoints)}>"

    def _indexes(self, nodes: Iterable[int | Mount | StrPath] | None) -> list[int] | None:
        if nodes is None:
            return None
        chosen = []
        for node in nodes:
            if isinstance(node, int):
                if not 0 <= node < len(self):
                    raise ValueError(f"no node {node} in a fleet of {len(self)}")
                chosen.append(node)
                continue
            mnt = _mountpoint(node)
            if mnt not in self.mountpoints:
                raise ValueError(f"{mnt} is not in this fleet")
            chosen.append(self.mountpoints.index(mnt))
        return sorted(set(chosen))

    def send(
        self,
        command: str,
        nodes: Iterable[int | Mount | StrPath] | None = None,
        check: bool = True,
        via: str = "fifo",
    ) -> FleetResult:
        """Send `command` (control-file text) to every node, or to `nodes`, at once; a lone
        powercut line is cut `via` "fifo", "signal" or "write" (send_to)."""
        result = send_to(self.mountpoints, command, self._indexes(nodes), self.timeout, via)
        if check:
            result.raise_for_failure()
        return result

    def powercut(
        self,
        nodes: Iterable[int | Mount | StrPath] | None = None,
        keep: str = "none",
        seed: int | None = None,
        check: bool = True,
        save: StrPath | None = None,
        via: str = "fifo",
    ) -> FleetResult:
        """Cut the power of every node (or `nodes`) at once: `keep` as `powercut keep=`
        (none, random, prefix), one fleet `seed` (random if None) from which each node's is
        derived; `save`: a path holding `{node}` where each node saves a copy of its image
        as the cut left it; `via`: how the cut reaches the daemons (send_to): "fifo" (the
        default: armed through each control file, then fired by one write to a FIFO all
        of them watch; the tightest spread under load), "signal" (armed, then SIGUSR2 to
        each daemon) or "write" (the powercut line written to every control file). The result has each node's
        answer, seed and cut, and the spread of the cuts."""
        words = ["powercut", f"keep={keep}"]
        if seed is not None:
            words.append(f"seed={int(seed)}")
        if save is not None:
            words.append(f"save={os.path.abspath(os.fspath(save))}")
        return self.send(shlex.join(words), nodes, check, via)

    def poweron(
        self, nodes: Iterable[int | Mount | StrPath] | None = None, check: bool = True
    ) -> FleetResult:
        """Power every node (or `nodes`) back on."""
        return self.send("poweron", nodes, check)

    def status(self) -> list[dict[str, Any]]:
        """Every node's status (as `blkfuse status --json`), in fleet order."""
        return [client.status(m) for m in self.mountpoints]


def _mountpoint(m: Mount | StrPath) -> str:
    path = m if isinstance(m, (str, os.PathLike)) else m.mountpoint
    return os.path.abspath(os.fspath(path))
