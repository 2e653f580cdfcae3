"""The control file's command language: parse a write, run it against the engine, render status.

A write to `control` is a unit. It is parsed whole first: one command per line, blank lines
and `#` comments ignored, words split like a shell does (quotes allowed). If any line is
invalid -- unknown command, wrong arguments, unknown event, a bad rule option -- the write fails
with that line's errno (EINVAL, or ENOENT for an unknown event) and nothing at all is applied.

Then the lines run in order. A line can still fail while running (ENOENT: no request suspended
at that tag, no rule with that id; ETIMEDOUT: wait_break or wait_hit timed out; EINVAL: reload
found a bad config). Such a line changes nothing itself, the lines before it stay done and the
lines after it are not run; the error names the line. So no line ever half-applies.

Everything here is pure trio + engine: no FUSE, no files (but `reload`, which calls back).
"""

from __future__ import annotations

import copy
import errno as _errno
import json
import logging
import math
import os
import secrets
import shlex
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from blkfuse.daemon import memory
from blkfuse.errors import BlkfuseError, ControlError, errno_name
from blkfuse.rules import config, keys, values
from blkfuse.rules.events import EVENTS, canonical_event, never_fires_note
from blkfuse.rules.model import InjectError, Rule, Settings, Tally

if TYPE_CHECKING:
    from blkfuse.block.device import BlockDevice
    from blkfuse.crash.undo import CutReport
    from blkfuse.daemon.trace import Stream, Tracer
    from blkfuse.engine.core import Engine, Interrupted

log = logging.getLogger(__name__)

# A human reads the text status: 100,000 rule lines would bury everything else.
TEXT_RULES_SHOWN = 200


# ---------------------------------------------------------------------------------------------
# the command table: every command is defined once, here; help and parsing come from it

Runner = Callable[..., Awaitable["str | Stream"]]


@dataclass(frozen=True)
class Command:
    """One control command: how it is written, what it does, how its words are read."""

    name: str
    usage: str  # "break EVENT TAG": the usage line and the help's left column
    summary: str  # the help's right column (may span lines)
    nargs: tuple[int, int | None]  # how many words may follow the name (None: any number)
    parse: Callable[[list[str]], tuple]  # the words after the name -> run's arguments
    run: Runner  # async run(control, *arguments) -> the answer text
    aliases: tuple[str, ...] = ()
    extension: bool = True  # qemu-io has no such command (break/resume/... it has)


COMMANDS: dict[str, Command] = {}  # by name and alias, in the order help lists them


def command(
    usage: str,
    summary: str,
    *,
    nargs: tuple[int, int | None] = (0, 0),
    parse: Callable[[list[str]], tuple] = tuple,
    aliases: tuple[str, ...] = (),
    extension: bool = True,
) -> Callable[[Runner], Runner]:
    """Register the decorated `async run(control, *args)` as a command; `usage` names it."""

    def register(run: Runner) -> Runner:
        name = usage.split()[0]
        entry = Command(name, usage, summary, nargs, parse, run, aliases, extension)
        for word in (name, *aliases):
            assert word not in COMMANDS, word
            COMMANDS[word] = entry
        return run

    return register


def commands() -> list[Command]:
    """Each command once, in help order."""
    return list({id(c): c for c in COMMANDS.values()}.values())


def help_text() -> str:
    lines = [
        "commands (one per line; a write is parsed whole and applied only if every line is valid):"
    ]
    for c in commands():
        first, *rest = c.summary.splitlines()
        lines.append(f"  {c.usage:<27} {first}".rstrip())
        lines.extend(f"  {'':<27} {more}" for more in rest)
    for kind in keys.KINDS:
        lines.append(f"{kind} keys (* a blkfuse extension: QEMU rejects it):")
        lines.extend(f"  {line}" for line in keys.help_lines(kind))
    lines += [
        "A bad line (syntax, unknown event, bad rule option) fails the whole write with nothing "
        "applied.",
        "A line that fails while running (unknown tag or rule id, timeout, bad config on reload) "
        "stops",
        "the write there: the lines before it stay done, the lines after it are not run.",
        "Errors: EINVAL bad input, ENOENT unknown event/tag/rule, ETIMEDOUT a wait timed out.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# reading the words of a command


def _tag(word: str) -> str:
    if not word:
        raise ValueError("empty tag")
    return word


def _event(word: str) -> str:
    event = canonical_event(word)
    if event is None:
        raise ControlError(
            _errno.ENOENT, f'unknown event "{word}"{config.did_you_mean(word, EVENTS)}'
        )
    return event


def _nonneg_int(word: str, what: str) -> int:
    try:
        n = int(word, 0)
    except ValueError:
        raise ValueError(f'{what} must be an integer, not "{word}"') from None
    if n < 0:
        raise ValueError(f"{what} must not be negative, not {word}")
    return n


def _seconds(word: str) -> float:
    """A timeout: a number of seconds (2.5), or a duration with its unit as rule keys take
    them (500ms, 10m, 1h30m: values.parse_duration)."""
    try:
        s = float(word)
    except ValueError:
        try:
            return values.parse_duration("timeout", word) / 1e6
        except values.Invalid as e:
            raise ValueError(f"{e} (or a number of seconds)") from None
    if not math.isfinite(s) or s < 0:
        raise ValueError(f'timeout must be a finite number of seconds >= 0, not "{word}"')
    return s


def _rule_parser(kind: str) -> Callable[[list[str]], tuple]:
    def parse_rule(words: list[str]) -> tuple:
        try:
            return (config.parse_rule_args(kind, words, source="control"),)
        except config.ConfigError as e:
            # ENOENT for an unknown event, as `break` (and qemu-io's break) answers it
            error = _errno.ENOENT if isinstance(e, config.UnknownEvent) else _errno.EINVAL
            raise ControlError(error, str(e).removeprefix("control: ")) from None

    return parse_rule


STATUS_USAGE = "status [json] [rules=all|N]"


def _status_format(words: list[str]) -> tuple[bool, int | None]:
    """[json] [rules=all|N] -> (as_json, how many rules to list: None for all). The text
    lists TEXT_RULES_SHOWN unless told, JSON every rule."""
    as_json = bool(words) and words[0] == "json"
    rest = words[1:] if as_json else words
    if len(rest) > 1 or (rest and not rest[0].startswith("rules=")):
        raise ValueError(f"usage: {STATUS_USAGE}")
    if not rest:
        return as_json, None if as_json else TEXT_RULES_SHOWN
    value = rest[0].removeprefix("rules=")
    return as_json, None if value == "all" else _nonneg_int(value, "rules= (all or a count)")


def _parse_line(words: list[str]) -> tuple[Command, tuple]:
    """One line -> (its command, the arguments for its run). Raises ControlError."""
    name, args = words[0], words[1:]
    entry = COMMANDS.get(name)
    if entry is None:
        hint = config.did_you_mean(name, [c.name for c in commands()]) or ' (try "help")'
        raise ControlError(_errno.EINVAL, f'unknown command "{name}"{hint}')
    low, high = entry.nargs
    if len(args) < low or (high is not None and len(args) > high):
        raise ControlError(_errno.EINVAL, f"usage: {entry.usage}")
    try:
        return entry, entry.parse(args)
    except ValueError as e:
        raise ControlError(_errno.EINVAL, str(e)) from None


def parse(text: str) -> list[tuple[int, Command, tuple]]:
    """The whole write -> [(line number, command, args)], or ControlError for the first bad line."""
    parsed = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # no closing quotation, ...
            raise ControlError(_errno.EINVAL, f"line {lineno}: {e}") from None
        if not words:
            continue
        try:
            entry, args = _parse_line(words)
        except ControlError as e:
            raise ControlError(e.errno, f"line {lineno}: {e.message}") from None
        parsed.append((lineno, entry, args))
    return parsed


# ---------------------------------------------------------------------------------------------
# running


class Control:
    """Runs control writes against one engine and renders its status.

    `reload` is a callable returning the new rule list (raising config.ConfigError on a bad
    config), or None when there is nothing to reload. `info` is shown as is in the status
    (image, mountpoint, options...); `pid` is added.
    """

    def __init__(
        self,
        engine: Engine,
        reload: Callable[[], list[Rule] | None] | None = None,
        info: dict[str, Any] | None = None,
        block: BlockDevice | None = None,
        tracer: Tracer | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings if settings is not None else Settings()  # the mount's options
        self.block = block  # block.BlockDevice: power cuts and the undo log
        self.tracer = tracer  # trace.Tracer, for the `trace` command
        self._reload = reload
        self.info = dict(info or {})
        self.info.setdefault("pid", os.getpid())
        self.last_result: str | None = None
        self.last_error: str | None = None
        self.last_error_errno: int | None = None
        self._closing = False
        self._waits: dict[trio.CancelScope, str] = {}  # pending wait_break -> its tag
        self._hit_waits: dict[trio.CancelScope, int] = {}  # pending wait_hit -> its rule id
        # powercut-arm: the cut the daemon's ARM_SIGNAL fires (daemon/lifecycle.py), and the
        # outcome of the last one fired (powercut-wait answers it)
        self.armed: ArmedCut | None = None
        self.fired: FiredCut | None = None
        self.firing: ArmedCut | None = None  # fired, its cut still running (revert, save)
        self.trigger: trio.CancelScope | None = None  # powercut-arm fifo=: its watch
        self._fired = trio.Event()

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Shutdown: refuse new commands, fail every pending wait_break and wait_hit with
        ESHUTDOWN."""
        self._closing = True
        for scope in [*self._waits, *self._hit_waits]:
            scope.cancel()
        if self.armed is not None:  # nothing fires during a shutdown; powercut-wait ends
            self.armed = None
            self.drop_trigger()
            self._fired.set()
        if self.tracer is not None:
            self.tracer.end_streams()  # trace readers get end of file

    # -- execute ----------------------------------------------------------------------------

    async def execute(self, text: str) -> str | Stream:
        """Run one write. Returns its answer text (may be empty), or after `trace` the
        trace.Stream the handle's reads come from; raises ControlError."""
        try:
            if self._closing:
                raise ControlError(_errno.ESHUTDOWN, "the mount is shutting down")
            parsed = parse(text)
            if any(entry.name == "trace" for _, entry, _ in parsed):
                if len(parsed) != 1:
                    raise ControlError(_errno.EINVAL, "trace must be the only command of its write")
                return await parsed[0][1].run(self)
            results: list[str] = []
            for lineno, entry, args in parsed:
                try:
                    answer = await entry.run(self, *args)
                    assert isinstance(answer, str)  # only `trace` answers a Stream: above
                    results.append(answer)
                except BlkfuseError as e:
                    done = " (lines before it were applied)" if results else ""
                    raise ControlError(e.errno, f"line {lineno}: {e.message}{done}") from None
                except trio.Cancelled:
                    # FUSE_INTERRUPT: the writer got a signal while this line waited (a
                    # wait_break, say); pyfuse3 answers the write EINTR. Shutdown does not
                    # get here: it fails a pending wait with ESHUTDOWN instead.
                    done = " (lines before it were applied)" if results else ""
                    # the line as written (its parsed arguments would read "True", "600")
                    what = " ".join(shlex.split(text.splitlines()[lineno - 1], comments=True))
                    self.last_error = (
                        f"line {lineno}: {what}: interrupted (the writer got a signal){done}"
                    )
                    self.last_error_errno = _errno.EINTR
                    raise
        except ControlError as e:
            self.last_error = e.message
            self.last_error_errno = e.errno
            raise
        summary = [r for r in results if r and "\n" not in r]
        if summary:
            self.last_result = "; ".join(summary)
        answers = [r for r in results if r]
        return "\n".join(a.rstrip("\n") for a in answers) + ("\n" if answers else "")

    def drop_trigger(self) -> None:
        """End the FIFO watch of powercut-arm fifo=, if any (it closes its fd)."""
        if self.trigger is not None and not self.trigger.shield:
            self.trigger.cancel()
        self.trigger = None

    async def fire_armed(self, by: str = "SIGUSR2") -> bool:
        """Fire the armed cut (the daemon's ARM_SIGNAL task calls this): the power goes off
        in this task's own turn, before it first awaits, through the one BlockDevice.power_cut.
        Its answer or error is kept for powercut-wait. False if nothing was armed."""
        armed, self.armed = self.armed, None
        if armed is None:
            return False
        self.drop_trigger()
        self.firing = armed
        try:
            block = _block_of(self, "powercut")
            report = await block.power_cut(
                armed.keep, armed.seed, armed.save, why=f"an armed powercut ({by})"
            )
        except BlkfuseError as e:
            error = ControlError(e.errno, f"the armed powercut failed: {e.message}")
            self.fired = FiredCut(armed, None, error)
            self.last_error, self.last_error_errno = error.message, e.errno
        else:
            self.fired = FiredCut(armed, _cut_answer(report), None)
            self.last_result = report.text()
        finally:
            self.firing = None
        self._fired.set()
        self._fired = trio.Event()
        return True

    async def wait_break(self, tag: str, timeout: float | None) -> str:
        with trio.CancelScope() as scope:
            self._waits[scope] = tag
            try:
                await self.engine.wait_break(tag, timeout)
            finally:
                del self._waits[scope]
        if scope.cancelled_caught:
            raise ControlError(_errno.ESHUTDOWN, f"wait_break {tag}: the mount is shutting down")
        return f"suspended at {tag}"

    async def wait_hit(self, rule_id: int, timeout: float | None, target: int | None = None) -> str:
        with trio.CancelScope() as scope:
            self._hit_waits[scope] = rule_id
            try:
                hits = await self.engine.wait_hit(rule_id, timeout, target)
            finally:
                del self._hit_waits[scope]
        if scope.cancelled_caught:
            raise ControlError(_errno.ESHUTDOWN, f"wait_hit {rule_id}: the mount is shutting down")
        return f"rule {rule_id} acted (hits={hits})"

    async def reload(self) -> str:
        if self._reload is None:
            raise ControlError(_errno.EINVAL, "reload: this mount has no config to reload")
        try:
            rules = await trio.to_thread.run_sync(self._reload)
        except config.ConfigError as err:
            raise ControlError(_errno.EINVAL, f"reload: {err} (old rules kept)") from None
        except OSError as err:
            raise ControlError(_errno.EINVAL, f"reload: {err} (old rules kept)") from None
        if rules is None:
            raise ControlError(_errno.EINVAL, "reload: this mount has no config to reload")
        rules = list(rules)
        self.engine.replace_rules(rules)
        return f"reloaded {len(rules)} rule{'s' if len(rules) != 1 else ''}"

    # -- status -----------------------------------------------------------------------------

    def status_dict(self, *, all_rules: bool = True, rules_listed: int | None = None) -> dict:
        """The status as plain JSON-able data. Keys are stable. `rules_listed`: list only
        the first that many rules and active ids (None: all; rule_count and active_count
        always count them all). `all_rules=False` leaves out the rule list (the text status
        renders its own, capped)."""
        e = self.engine
        now = time.monotonic()
        every_rule = e.rules()
        active = [r.id for r in e.active()]
        rules = None
        if all_rules:
            rules = [_rule_dict(*state) for state in rule_states(e, every_rule[:rules_listed])]
        suspended = []
        for s in e.suspended():
            req = s.request
            suspended.append(
                {
                    "tags": list(s.tags),
                    "event": s.event,
                    "op": req.op if req is not None else None,
                    "offset": req.offset if req is not None else None,
                    "length": req.length if req is not None else None,
                    "seconds": round(max(0.0, now - s.since), 3),
                }
            )
        return {
            "info": dict(self.info),
            "seed": e.seed,
            "state": e.state,
            "rules": rules,
            "rule_count": len(every_rule),
            "active": active[:rules_listed],
            "active_count": len(active),
            "breakpoints": [{"event": ev, "tag": tag} for ev, tag in e.breakpoints()],
            "suspended": suspended,
            "waiting": sorted(self._waits.values()),
            "waiting_hits": sorted(self._hit_waits.values()),
            "events": {name: e.event_counts[name] for name in EVENTS if e.event_counts.get(name)},
            "errors_injected": [
                {"errno": n, "name": errno_name(n), "count": c}
                for n, c in sorted(e.errors_injected.items())
                if c
            ],
            "rules_healed": e.rules_healed,
            "held_by_delay": self._held(),
            # The old name of held_by_delay, kept for one release (it read like unsynced.held).
            "held": self._held(),
            "interrupted": {"count": e.interrupted, "last": _interrupted_dict(e.last_interrupted)},
            "last_result": self.last_result,
            "last_error": self.last_error,
            "last_error_errno": self.last_error_errno,
            **self._power_status(),
            "log_writes": self._log_writes_status(),
            "backing_reads": (
                self.block.stack.image.read_counts() if self.block is not None else None
            ),
        }

    def _log_writes_status(self) -> dict | None:
        """The write log (-o log-writes=FILE): its path and entries so far, else None."""
        from blkfuse.crash.recorder import Recorder

        recorder = self.block.stack.find(Recorder) if self.block is not None else None
        if recorder is None:
            return None
        return {
            "path": recorder.path,
            "entries": recorder.entries,
            "sectorsize": recorder.sectorsize,
        }

    def _held(self) -> int:
        """Requests a delay rule holds now (the block layer holds them: BlockDevice.holds)."""
        return len(self.block.holds) if self.block is not None else 0

    def _power_status(self) -> dict:
        """ "power" and "unsynced" (null when writes are not tracked) for the status."""
        block = self.block
        undo = block.stack.undo if block is not None else None
        unsynced = None
        if undo is not None:
            log = undo.log
            unsynced = {
                "writes": len(log),
                "bytes": log.bytes,
                "held": log.held(),
                "cap": log.cap,
                "refused": log.refused,
                "last_refusal": log.last_refusal,
            }
        cut_at = block.cut_at if block is not None else None
        last_cut = block.last_cut if block is not None else None
        return {
            "power": "off" if block is not None and not block.powered else "on",
            "unsynced": unsynced,
            # when the last powercut switched the power off (null: never): Fleet's spread
            "power_off_at": (
                None if cut_at is None else {"monotonic_ns": cut_at[0], "realtime_ns": cut_at[1]}
            ),
            "last_cut": last_cut.as_dict() if last_cut is not None else None,
            # powercut-arm: the cut a signal would fire now (null: none armed)
            "armed": None if self.armed is None else self.armed.as_dict(),
        }

    def status_text(self, rules_listed: int | None = TEXT_RULES_SHOWN) -> str:
        """The human status; it lists the first `rules_listed` rules and active ids (None:
        all) and says how to get the rest."""
        d = self.status_dict(all_rules=False)
        out = []
        info = d["info"]
        if info.get("image"):
            opts = [f"cache={info.get('cache', 'writeback')}"]
            if info.get("format", "raw") != "raw":
                opts.append(f"format={info['format']}")
            opts += [
                f"{k.replace('_', '-')}={info[k]}"
                for k in (
                    "align",
                    "max_transfer",
                    "opt_write_zero",
                    "max_write_zero",
                    "opt_discard",
                    "max_discard",
                )
                if info.get(k)
            ]
            if info.get("read_only"):
                opts.append("read-only")
            if info.get("growable"):
                opts.append("growable")
            if info.get("locking") is False:
                opts.append("locking=off")
            if info.get("qemu"):
                opts.append(f"qemu={info['qemu']}")  # the profile (rules/profiles.py)
            out.append(f"image: {info['image']}" + (f" ({', '.join(opts)})" if opts else ""))
        if info.get("mountpoint"):
            out.append(f"mount: {info['mountpoint']} (daemon pid {info.get('pid')})")
        if info.get("config"):
            out.append(f"config: {info['config']}")
        out.append(f"seed: {d['seed']} (-o seed={d['seed']} replays this run's random decisions)")
        out.append(f"state: {d['state']}")

        rules = self.engine.rules()
        out.append(f"rules: {len(rules)}" if rules else "rules: none")
        for r in rules[:rules_listed]:
            src = f"  [{r.source}]" if r.source else ""
            spent = " spent" if r.spent else ""
            out.append(
                f"  {r.id:>4}  {_format_rule(r)}  hits={r.hits}{_did(r, self.engine)}{spent}{src}"
            )
        if rules_listed is not None and len(rules) > rules_listed:
            out.append(
                f"  ... {len(rules) - rules_listed} more, not listed here (`blkfuse status "
                "--all MNT` or the command `status rules=all` lists every rule; `status json` "
                "too)"
            )
        active = d["active"]
        shown = " ".join(str(i) for i in active[:rules_listed])
        if rules_listed is not None and len(active) > rules_listed:
            shown += f" ... ({len(active)} rules)"
        out.append("active: " + (shown or "none"))

        bps = d["breakpoints"]
        out.append(
            "breakpoints: " + (", ".join(f"{b['tag']} on {b['event']}" for b in bps) or "none")
        )
        sus = d["suspended"]
        out.append(f"suspended: {len(sus)}" if sus else "suspended: none")
        for s in sus:
            where = ""
            if s["op"] is not None:
                where = f" {s['op']} offset={s['offset']} length={s['length']}"
            out.append(f"  {','.join(s['tags'])} at {s['event']}:{where} for {s['seconds']:.1f}s")
        if d["held_by_delay"]:
            out.append(f"held by a delay rule: {d['held_by_delay']}")

        if d["waiting"]:
            out.append("wait_break pending: " + " ".join(d["waiting"]))
        if d["waiting_hits"]:
            out.append("wait_hit pending: " + " ".join(map(str, d["waiting_hits"])))
        ev = d["events"]
        out.append("events: " + (" ".join(f"{k}={v}" for k, v in ev.items()) or "none"))
        errs = d["errors_injected"]
        out.append(
            "errors injected: "
            + (" ".join(f"{x['name']}({x['errno']})={x['count']}" for x in errs) or "none")
        )
        intr = d["interrupted"]
        if intr["count"]:
            last = intr["last"]
            where = (
                f" {last['op']} offset={last['offset']} length={last['length']}"
                if last["op"] is not None
                else ""
            )
            out.append(
                f"interrupted: {intr['count']} (last: {','.join(last['tags'])} at "
                f"{last['event']}:{where})"
            )
        else:
            out.append("interrupted: none")
        out.append(f"power: {d['power']}")
        u = d["unsynced"]
        if u is None:
            out.append("unsynced: not tracked (-o track-unsynced=on)")
        else:
            out.append(
                f"unsynced: {u['writes']} writes, {u['bytes']} bytes (log holds "
                f"{u['held']} of cap {u['cap']}; {u['refused']} refused at the cap)"
            )
        block = self.block
        if block is not None and block.last_cut is not None:
            out.append(f"last cut: {block.last_cut.text()}")
        if self.armed is not None:
            fifo = f" or a write to {self.armed.fifo}" if self.armed.fifo else ""
            out.append(
                f"armed: {self.armed.text()} (fired by SIGUSR2 to pid {info.get('pid')}{fifo})"
            )
        out.append(f"last result: {d['last_result'] or '-'}")
        if d["last_error"]:
            out.append(f"last error: {errno_name(d['last_error_errno'])}: {d['last_error']}")
        else:
            out.append("last error: none")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the commands, in help order


@command(
    "break EVENT TAG",
    "suspend the next request that raises EVENT under TAG",
    nargs=(2, 2),
    parse=lambda w: (_event(w[0]), _tag(w[1])),
    extension=False,
)
async def _break(control: Control, event: str, tag: str) -> str:
    control.engine.add_breakpoint(event, tag)
    note = never_fires_note(event)
    return f"breakpoint {tag} on {event}{note}"


@command(
    "resume TAG",
    "let the request suspended at TAG go on",
    nargs=(1, 1),
    parse=lambda w: (_tag(w[0]),),
    extension=False,
)
async def _resume(control: Control, tag: str) -> str:
    control.engine.resume(tag)
    return f"resumed {tag}"


@command(
    "remove_break TAG",
    "drop the breakpoint TAG (waking its request, if any)",
    nargs=(1, 1),
    parse=lambda w: (_tag(w[0]),),
    extension=False,
)
async def _remove_break(control: Control, tag: str) -> str:
    control.engine.remove_breakpoint(tag)
    return f"removed breakpoint {tag}"


@command(
    "wait_break TAG [SECONDS]",
    "block until a request is suspended at TAG (ETIMEDOUT after SECONDS)",
    nargs=(1, 2),
    extension=False,
    parse=lambda w: (_tag(w[0]), _seconds(w[1]) if len(w) == 2 else None),
)
async def _wait_break(control: Control, tag: str, timeout: float | None) -> str:
    return await control.wait_break(tag, timeout)


def _wait_hit_args(words: list[str]) -> tuple[int, float | None, int | None]:
    """ID [SECONDS] [hits=N], the last two in either order."""
    rule_id = _nonneg_int(words[0], "rule id")
    timeout = hits = None
    for word in words[1:]:
        if word.startswith("hits="):
            if hits is not None:
                raise ValueError("hits= given twice")
            hits = _nonneg_int(word[5:], "hits")
        elif timeout is None:
            timeout = _seconds(word)
        else:
            raise ValueError(f'one timeout only, then "{word}" (hits=N for a count)')
    return rule_id, timeout, hits


@command(
    "wait_hit ID [SECONDS] [hits=N]",
    "block until rule ID has acted (failed a request, begun a delay,\n"
    "set a state) once more, or at once if it is spent (its last act\n"
    "has begun); hits=N: until it has N hits in all (race-free);\n"
    "ENOENT for an unknown rule or one that cannot get there,\n"
    "ETIMEDOUT after SECONDS",
    nargs=(1, 3),
    parse=_wait_hit_args,
)
async def _wait_hit(control: Control, rule_id: int, timeout: float | None, hits: int | None) -> str:
    return await control.wait_hit(rule_id, timeout, hits)


@command(
    "inject-error KEY=VALUE ...",
    "add an [inject-error] rule (its keys below); its id is in the status",
    nargs=(1, None),
    parse=_rule_parser("inject-error"),
    aliases=("inject_error",),
)
async def _inject_error(control: Control, rule: Rule) -> str:
    _check_rule_needs(rule, control)
    rule_id = control.engine.add_rule(rule)
    # rules armed by `none` next to rules armed later: the first later arming drops them
    warning = config.arming_warning(control.engine.rules_by_event())
    return f"added rule {rule_id}{config.rule_notes(rule)}" + (f" ({warning})" if warning else "")


@command(
    "set-state KEY=VALUE ...",
    "add a [set-state] rule (its keys below)",
    nargs=(1, None),
    parse=_rule_parser("set-state"),
    aliases=("set_state",),
)
async def _set_state_rule(control: Control, rule: Rule) -> str:
    return f"added rule {control.engine.add_rule(rule)}{config.rule_notes(rule)}"


@command(
    "remove ID", "remove rule ID", nargs=(1, 1), parse=lambda w: (_nonneg_int(w[0], "rule id"),)
)
async def _remove(control: Control, rule_id: int) -> str:
    control.engine.remove_rule(rule_id)
    return f"removed rule {rule_id}"


@command("clear", "remove every rule (breakpoints stay)")
async def _clear(control: Control) -> str:
    n = len(control.engine.rules())
    control.engine.clear()
    return f"removed {n} rule{'s' if n != 1 else ''}"


@command(
    "state N",
    "set the current state to N",
    nargs=(1, 1),
    parse=lambda w: (_nonneg_int(w[0], "state"),),
)
async def _state(control: Control, state: int) -> str:
    control.engine.set_state(state)
    return f"state {state}"


@command("reload", "re-read the config file and -o rules (replaces every rule)")
async def _reload(control: Control) -> str:
    return await control.reload()


@command(
    STATUS_USAGE,
    "answer the status (read it back on the same open file); the text\n"
    f"lists {TEXT_RULES_SHOWN} rules, JSON every rule, unless rules= says:\n"
    "rules=0 (just the rest of the status, as umount asks it) or all",
    nargs=(0, 2),
    parse=_status_format,
)
async def _status(control: Control, as_json: bool, rules_listed: int | None) -> str:
    if not as_json:
        return control.status_text(rules_listed)
    # What changes (counters, each rule's hits) is read here, in one turn of the loop: a
    # snapshot. What a rule is (its keys, its text) never changes, and rendering it and
    # the JSON for 100,000 rules takes seconds: in a thread, the mount serving I/O meanwhile.
    status = control.status_dict(all_rules=False, rules_listed=rules_listed)
    states = rule_states(control.engine, control.engine.rules()[:rules_listed])

    def render() -> str:
        status["rules"] = [_rule_dict(*state) for state in states]
        return json_document(status)

    if len(states) < 1000:
        return render()

    def render_and_give_back() -> str:
        try:
            return render()
        finally:
            # The rule dicts are garbage now: drop them, then give their heap back (glibc
            # keeps it otherwise: 60 -> 140 MB of RSS for 100k rules, for good).
            status["rules"] = None
            states.clear()
            memory.give_back()

    return await trio.to_thread.run_sync(render_and_give_back)


def json_document(status: dict[str, Any]) -> str:
    """The status as `status json` answers it: indented, but each rule on one line and the
    active ids on one line, encoded by json's C encoder (it does not indent) in one pass:
    100,000 rules indented whole took seconds and made a 100 MB answer."""
    compact = json.JSONEncoder(separators=(", ", ": ")).encode
    lines = []
    for key, value in status.items():
        if key == "rules" and value:
            text = "[\n    " + ",\n    ".join(map(compact, value)) + "\n  ]"
        elif key == "active":
            text = compact(value)
        else:  # a string holds no raw newline (JSON escapes it): indent the nested lines
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ---- power cuts (README "Power cuts"; blkfuse extensions) ----

POWERCUT_USAGE = "powercut [keep=none|random|prefix] [seed=N] [save=PATH]"


def _parse_powercut(words: list[str]) -> tuple[str, int | None, str | None]:
    """powercut's KEY=VALUE words -> (keep, seed, save); seed None: pick one (and tell it)."""
    from blkfuse.crash.undo import KEEP_MODES

    given = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or key not in ("keep", "seed", "save"):
            raise ValueError(
                f"powercut: expected keep=..., seed=... or save=..., not {word!r} "
                f"(usage: {POWERCUT_USAGE})"
            )
        if key in given:
            raise ValueError(f"powercut: {key} given twice")
        given[key] = value
    keep = given.get("keep", "none")
    if keep not in KEEP_MODES:
        raise ValueError(
            f"powercut: keep must be none, random or prefix, not {keep!r}"
            f"{config.did_you_mean(keep, KEEP_MODES)}"
        )
    seed = _nonneg_int(given["seed"], "seed") if "seed" in given else None
    save = given.get("save")
    if save is not None and not save.startswith("/"):
        raise ValueError(
            f"powercut: save= needs an absolute path (the daemon runs in /), not {save!r}"
        )
    return keep, seed, save


def _check_rule_needs(rule: Rule, control: Control) -> None:
    """A key that needs a mount option the mount lacks (config.check_rule_needs)."""
    try:
        config.check_rule_needs([rule], control.settings, where="control")
    except config.ConfigError as e:
        raise ControlError(_errno.EINVAL, str(e).removeprefix("control: ")) from None


def _check_save_path(path: str, mountpoint: str | None) -> None:
    """Refuse, before cutting, a save= path whose directory cannot take the copy. Runs in a
    thread: a path through another FUSE mount must not stall this daemon's loop."""
    if mountpoint and os.path.normpath(path).startswith(os.path.normpath(mountpoint) + "/"):
        raise ControlError(
            _errno.EINVAL, f"powercut: save={path}: not inside the mount (it holds no files)"
        )
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        raise ControlError(_errno.ENOENT, f"powercut: save={path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ControlError(_errno.EACCES, f"powercut: save={path}: cannot write in {directory}")
    if os.path.isdir(path):
        raise ControlError(_errno.EISDIR, f"powercut: save={path}: is a directory")


def _block_of(control: Control, name: str) -> BlockDevice:
    if control.block is None:
        raise ControlError(_errno.EINVAL, f"{name}: this control has no block device")
    return control.block


@command(
    POWERCUT_USAGE,
    "\nlose the unsynced writes (-o track-unsynced=on) and power off:\n"
    "every request fails with EIO until poweron; save=PATH: a sparse\n"
    "copy of the image as the cut left it. The answer's last line is\n"
    "JSON (as status json's last_cut: keep, seed, lost/torn extents)",
    nargs=(0, 3),
    parse=_parse_powercut,
)
async def _powercut(control: Control, keep: str, seed: int | None, save: str | None) -> str:
    block = _block_of(control, "powercut")
    if save is not None:
        await trio.to_thread.run_sync(_check_save_path, save, control.info.get("mountpoint"))
    if seed is None:
        seed = secrets.randbits(32)
    report = await block.power_cut(keep, seed, save)
    control.last_result = report.text()  # the answer has two lines: not summarised by execute
    return _cut_answer(report)


def _cut_answer(report: CutReport) -> str:
    """What powercut (and powercut-wait, for an armed cut) answers."""
    return (
        report.text()
        + "; the power is off (poweron brings the device back)\n"
        + json.dumps(report.as_dict(), separators=(",", ":"))
    )


# ---- armed cuts: set up through the control file, fired by a signal or a FIFO ----
# A control write queues in /dev/fuse behind the mount's own requests; a signal or a FIFO
# does not, so cuts of several loaded mounts land together (client/fleet.py, docs/clusters.md).


@dataclass(frozen=True)
class ArmedCut:
    """A powercut-arm: what the signal will cut with."""

    keep: str
    seed: int
    save: str | None
    fifo: str | None = None  # also fired when this FIFO becomes readable

    def text(self) -> str:
        save = f" save={self.save}" if self.save is not None else ""
        return f"powercut keep={self.keep} seed={self.seed}{save}"

    def as_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "seed": self.seed, "save": self.save, "fifo": self.fifo}


@dataclass(frozen=True)
class FiredCut:
    """An armed cut after its signal: the cut's answer, or why it failed."""

    armed: ArmedCut
    answer: str | None
    error: ControlError | None


def _parse_powercut_arm(words: list[str]) -> tuple[str, int | None, str | None, str | None]:
    """powercut's words plus fifo=PATH -> (keep, seed, save, fifo)."""
    fifos = [w.removeprefix("fifo=") for w in words if w.startswith("fifo=")]
    if len(fifos) > 1:
        raise ValueError("powercut-arm: fifo given twice")
    if fifos and not fifos[0].startswith("/"):
        raise ValueError(f"powercut-arm: fifo= needs an absolute path, not {fifos[0]!r}")
    keep, seed, save = _parse_powercut([w for w in words if not w.startswith("fifo=")])
    return keep, seed, save, fifos[0] if fifos else None


def _open_fifo(path: str) -> int:
    """The read end of the FIFO at `path`, not blocking (a writer need not exist yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ControlError(
            e.errno or _errno.EIO, f"powercut-arm: fifo={path}: {e.strerror}"
        ) from None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise ControlError(_errno.EINVAL, f"powercut-arm: fifo={path}: not a FIFO (mkfifo)")
    return fd


async def _fire_when_readable(control: Control, fd: int, scope: trio.CancelScope) -> None:
    """A system task: fire the armed cut once the FIFO is readable (a writer wrote, or the
    last writer closed it). It reads nothing: the other daemons on the same FIFO must see it
    readable too. Ends, closing the fd, when the cut fires or is disarmed."""
    try:
        with scope:
            await trio.lowlevel.wait_readable(fd)
            scope.shield = True  # disarm can no longer stop a cut under way
            if control.armed is not None and control.armed.fifo is not None:
                await control.fire_armed(by=f"fifo={control.armed.fifo}")
    except Exception:  # a system task's exception would end the daemon
        log.exception("powercut-arm: the FIFO watch failed")
    finally:
        os.close(fd)


def _check_armable(control: Control, block: BlockDevice) -> None:
    if control.armed is not None:
        raise ControlError(
            _errno.EBUSY,
            f"powercut-arm: a cut is already armed ({control.armed.text()}); powercut-disarm first",
        )
    if block.stack.undo is None:
        raise ControlError(
            _errno.EINVAL,
            "powercut-arm: powercut needs -o track-unsynced=on (without it blkfuse keeps "
            "nothing to undo unsynced writes with)",
        )
    if not block.powered:
        raise ControlError(_errno.EINVAL, "powercut-arm: the power is already off (poweron first)")


@command(
    "powercut-arm [keep=none|random|prefix] [seed=N] [save=PATH] [fifo=PATH]",
    "\narm a powercut (checked now, words as powercut's) that SIGUSR2 to the\n"
    "daemon (status json info.pid) fires at once, without queueing behind\n"
    "the mount's requests as a control write does (blkfuse ctl MNT... --\n"
    "powercut uses it); fifo=PATH: also fired when that FIFO turns readable\n"
    "(one write fires every daemon armed on it); refused while one is armed\n"
    "(EBUSY) or the power is off",
    nargs=(0, 4),
    parse=_parse_powercut_arm,
)
async def _powercut_arm(
    control: Control, keep: str, seed: int | None, save: str | None, fifo: str | None
) -> str:
    block = _block_of(control, "powercut-arm")
    _check_armable(control, block)
    if save is not None:
        await trio.to_thread.run_sync(_check_save_path, save, control.info.get("mountpoint"))
        _check_armable(control, block)  # again: another write may have armed meanwhile
    fd = _open_fifo(fifo) if fifo is not None else None  # the last check: nothing after fails
    control.armed = ArmedCut(keep, secrets.randbits(32) if seed is None else seed, save, fifo)
    if fd is not None:
        control.trigger = trio.CancelScope()
        trio.lowlevel.spawn_system_task(
            _fire_when_readable, control, fd, control.trigger, name="blkfuse-powercut-fifo"
        )
    by = f" or a write to {fifo}" if fifo is not None else ""
    return f"armed: {control.armed.text()}; SIGUSR2 to pid {os.getpid()}{by} fires it"


@command("powercut-disarm", "drop the armed powercut (ENOENT: none armed)")
async def _powercut_disarm(control: Control) -> str:
    if control.armed is None:
        raise ControlError(_errno.ENOENT, "powercut-disarm: no powercut is armed")
    armed, control.armed = control.armed, None
    control.drop_trigger()
    control.fired = None
    control._fired.set()  # a powercut-wait for it ends: nothing will fire
    control._fired = trio.Event()
    return f"disarmed: {armed.text()}"


def _optional_seconds(words: list[str]) -> tuple[float | None]:
    return (_seconds(words[0]) if words else None,)


@command(
    "powercut-wait [TIMEOUT]",
    "wait until the armed powercut has fired (at once if it has) and answer\n"
    "as powercut does (ENOENT: none armed, or disarmed; ETIMEDOUT)",
    nargs=(0, 1),
    parse=_optional_seconds,
)
async def _powercut_wait(control: Control, timeout: float | None) -> str:
    if control.armed is not None or control.firing is not None:
        fired = control._fired
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await fired.wait()
        if control._closing:
            raise ControlError(_errno.ESHUTDOWN, "the mount is shutting down")
        if not fired.is_set():
            raise ControlError(
                _errno.ETIMEDOUT, f"powercut-wait: the armed cut did not fire within {timeout:g} s"
            )
    if control.fired is None:
        raise ControlError(
            _errno.ENOENT, "powercut-wait: no armed powercut fired (none armed, or disarmed)"
        )
    if control.fired.error is not None:
        raise control.fired.error
    assert control.fired.answer is not None
    return control.fired.answer


def _parse_poweron(words: list[str]) -> tuple[bool]:
    if words and words != ["force"]:
        raise ValueError(f"usage: poweron [force] (not {' '.join(words)!r})")
    return (bool(words),)


@command(
    "poweron [force]",
    "bring the device back (the image as the cut left it); refused while a\n"
    "loop device or a process holds the image (force: anyway)",
    nargs=(0, 1),
    parse=_parse_poweron,
)
async def _poweron(control: Control, force: bool) -> str:
    block = _block_of(control, "poweron")
    if block.powered:
        return "power on (it was on)"
    if not force:
        busy = await trio.to_thread.run_sync(_image_holders, control.info)
        if busy:
            who, fixes = busy
            raise ControlError(
                _errno.EBUSY,
                f"poweron: refused: the image is still held by {who} (what it wrote before "
                f"the cut could reach the image after the poweron); {fixes}, then poweron; "
                "or `poweron force`",
            )
    block.power_on()
    return "power on" + (" (forced)" if force else "")


def _image_holders(info: dict[str, Any]) -> tuple[str, str] | None:
    """Who holds the mount's image file and what to do about it, in order, as `umount`
    says it (client/holders.py); None if nothing does. Runs in a thread: the stat is a FUSE
    request to this very daemon, and a loop device given `losetup -d` is waited for."""
    from blkfuse.client import holders

    mountpoint, name = info.get("mountpoint"), info.get("name")
    if not mountpoint or not name:
        return None
    path = os.path.join(os.path.realpath(mountpoint), name)
    try:
        st = os.stat(path)
    except OSError:
        return None
    found = holders.find(path, st.st_dev, st.st_ino)
    found.loops = holders.settle(found.loops)  # one just given losetup -d is on its way
    if not found:
        return None
    fixes = [use.fix() for use in found.loop_uses()]
    if found.processes:
        fixes.append("end or close those processes")
    return found.describe(), "; ".join(fixes)


def _mark_name(words: list[str]) -> tuple[str]:
    if not words[0] or "\0" in words[0]:
        raise ControlError(_errno.EINVAL, "mark: the name is empty")
    return (words[0],)


@command(
    "mark NAME",
    "append a mark entry named NAME to the write log (-o log-writes=FILE),\n"
    "e.g. where a workload was acknowledged: blkfuse replay --end-mark NAME",
    nargs=(1, 1),
    parse=_mark_name,
)
async def _mark(control: Control, name: str) -> str:
    from blkfuse.crash.recorder import Recorder

    block = _block_of(control, "mark")
    recorder = block.stack.find(Recorder)
    if recorder is None:
        raise ControlError(_errno.EINVAL, "mark needs a write log: mount with -o log-writes=FILE")
    try:
        block.stack.mark(name)
    except ValueError as error:  # too long for the log's sector
        raise ControlError(_errno.EINVAL, f"mark: {error}") from None
    return f"mark {name}: entry {recorder.entries - 1} of {recorder.path}"


@command("help", "this text")
async def _help(control: Control) -> str:
    return help_text()


@command(
    "trace",
    "alone in its write: reads of this open file then stream the trace\n"
    "(one JSON line per image request) until it is closed",
)
async def _trace(control: Control) -> Stream:
    if control.tracer is None:
        raise ControlError(_errno.EINVAL, "this mount has no trace")
    return control.tracer.open_stream()  # not text: fs.py serves the handle's reads from it


def _interrupted_dict(interrupted: Interrupted | None) -> dict[str, Any] | None:
    """engine.Interrupted (a held request whose caller got a signal) as status data."""
    if interrupted is None:
        return None
    req = interrupted.request
    return {
        "tags": list(interrupted.tags),
        "event": interrupted.event,
        "op": req.op if req is not None else None,
        "offset": req.offset if req is not None else None,
        "length": req.length if req is not None else None,
    }


def _format_rule(rule: Rule) -> str:
    try:
        return config.format_rule(rule)
    except Exception:  # status must never fail because of a formatting gap
        return repr(rule)


def _did(r: Rule, engine: Engine) -> str:
    """What an extension rule did, beyond its hits: ' (failed=1 delayed=2 corrupted=0)'."""
    if getattr(r, "ext", None) is None:
        return ""
    tally = engine.tally(r)
    return f" (failed={tally.failed} delayed={tally.delayed} corrupted={tally.corrupted})"


RuleState = tuple[Rule, int, bool, "Tally | None"]


def rule_states(engine: Engine, rules: list[Rule]) -> list[RuleState]:
    """What changes of each rule, copied now: (rule, hits, spent, a copy of its tally if it
    has extension keys). The rest of a rule never changes (engine.core sets hits, spent
    and tallies only), so _rule_dict may render it later, in another thread."""
    return [
        (r, r.hits, r.spent, copy.copy(engine.tally(r)) if getattr(r, "ext", None) else None)
        for r in rules
    ]


def _rule_dict(r: Rule, hits: int, spent: bool, tally: Tally | None) -> dict[str, Any]:
    """A rule in the JSON status, from its state as rule_states took it (not r's own hits,
    spent and tally, which may have moved since)."""
    d = {
        "id": r.id,
        "kind": r.kind,
        "event": r.event,
        "state": r.state,
        "source": r.source,
        "hits": hits,
        "spent": spent,
        "text": _format_rule(r),
    }
    d.update(keys.rule_json(r))
    if isinstance(r, InjectError):
        d["errno_name"] = errno_name(r.errno)
        d.update(_tally_dict(r, hits, tally))
    return d


def _tally_dict(r: InjectError, hits: int, tally: Tally | None) -> dict[str, Any]:
    """What the rule did: failed, delayed, corrupted (a QEMU rule only fails, or with errno 0
    passes)."""
    if tally is None:
        return {"failed": hits if r.errno else 0, "delayed": 0, "corrupted": 0, "reached": hits}
    return {
        "failed": tally.failed,
        "delayed": tally.delayed,
        "corrupted": tally.corrupted,
        "reached": tally.seen,
    }
