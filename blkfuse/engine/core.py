"""The blkdebug rule engine: state, rules per event, the active set, checks, breakpoints.

Pure: no file I/O and no FUSE. It follows QEMU 7.2's block/blkdebug.c as observed
(docs/design.md, "Rule semantics"):

- `fire(event)` runs the event's rules against the state *at event time*: the matching
  inject-error rules replace the active set (only if there is at least one), the first
  matching set-state rule in file order sets the new state, then breakpoints on the event
  suspend the request.
- `decide(iotype, offset, length, caller)` picks the first active rule (in file order) whose
  iotype allows the request and whose sector byte, if any, lies inside it, and answers
  (that rule, its outcome): 0, an errno, or an Effect (extension rules: hold, corrupt).
  Every rule that acts on a request goes through `_hit`: its hits, the wait_hit waiters,
  the tracer, the errors counted.

blkfuse's extension keys (README "Beyond blkdebug") only add to this: a rule with any of them
carries `rule.ext`, and while such a rule is armed `decide` walks the candidates in priority
order and lets each decide (caller, after, probability, heal) whether it acts; the first that
acts decides the request. Persistent rules sit in a second active set that no event replaces.
While no extension rule is armed, `decide` takes the plain path: QEMU's one lookup.

What the engine does not do: sleep (a delay is an Effect the block layer holds the request
for) or read /proc (a caller filter asks the request's Sender, which the FUSE layer gives).
Breakpoint suspension uses trio primitives, so a suspended request costs one parked task.
"""

import errno as _errno
import math
import random
import secrets
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import trio

from blkfuse.engine.effects import Effect
from blkfuse.errors import BlkfuseError
from blkfuse.rules.events import EVENTS, IOTYPES, canonical_event
from blkfuse.rules.model import SECTOR_SIZE, Extensions, InjectError, Rule, SetState, Tally
from blkfuse.rules.profiles import DEFAULT, Profile


class EngineError(BlkfuseError):
    """A command the engine cannot carry out; `errno` is what the control write fails with."""


class Sender(Protocol):
    """Who sent a request, as caller filters (pid=, uid=, comm=) ask: the FUSE layer gives one
    (daemon/callers.py: from the request's context, the rest read from /proc on demand)."""

    @property
    def pid(self) -> int: ...  # the sending thread

    @property
    def uid(self) -> int: ...

    def process(self) -> int | None:
        """The process (thread group) the sending thread belongs to; None if gone."""
        ...

    def command(self) -> str | None:
        """Its command name (15 bytes at most, as /proc/PID/comm); None if gone."""
        ...


# decide()'s answer when no rule acts: one shared tuple, nothing allocated per request.
_PASS: "tuple[InjectError | None, int | Effect]" = (None, 0)


class Request(NamedTuple):
    """What a request was doing when it raised an event: shown for suspended requests."""

    op: str  # "read" | "write" | "write-zeroes" | "flush"
    offset: int
    length: int


class Interrupted(NamedTuple):
    """A suspended request whose caller was interrupted (a signal): it ended with EINTR."""

    tags: tuple[str, ...]
    event: str
    request: Request | None


class Suspension:
    """A request parked at a breakpoint until each of its tags has been resumed."""

    __slots__ = (
        "event",
        "tags",
        "request",
        "since",
        "_done",
        "_registry",
        "_on_interrupt",
        "_failure",
    )

    def __init__(
        self,
        event: str,
        tags: list[str],
        request: Request | None,
        registry: list,
        on_interrupt: Callable[["Suspension"], None] | None = None,
    ):
        self.event = event
        self.tags = tags  # remaining tags; one `resume` takes one
        self.request = request
        self.since = time.monotonic()
        self._done = trio.Event()
        self._registry = registry  # the engine's list of suspensions
        self._on_interrupt = on_interrupt
        self._failure: OSError | None = None  # set by abort: what wait() raises

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def release(self) -> None:
        if self in self._registry:
            self._registry.remove(self)
        self.tags.clear()
        self._done.set()

    def abort(self, failure: OSError) -> None:
        """Release it so that its wait() raises `failure`: the request fails when it wakes,
        whatever happened meanwhile (a power cut: a poweron before it runs changes nothing)."""
        self._failure = failure
        self.release()

    async def wait(self) -> None:
        try:
            await self._done.wait()
        finally:
            # Cancelled before it was resumed: its caller was interrupted (FUSE_INTERRUPT;
            # shutdown resumes everything first). It must not stay listed.
            if not self._done.is_set():
                if self._on_interrupt is not None:
                    self._on_interrupt(self)
                self.release()
        if self._failure is not None:  # a fresh exception per waiter: tracebacks differ
            raise OSError(self._failure.errno, self._failure.strerror)


class RequestKind:
    """One kind of request the lean path serves (Engine.request_kind): the io type it is
    checked as, the events it raises, and how many unseen() let through."""

    __slots__ = ("iotype", "events", "unseen", "has_rules", "rules_seen")

    def __init__(self, iotype: str, events: tuple[str, ...]):
        self.iotype = iotype
        self.events = events
        self.unseen = 0
        # whether a rule is on one of its events, as of the engine's rule_changes rules_seen
        self.has_rules = True
        self.rules_seen = -1


class _ActiveSet:
    """The armed inject-error rules, indexed so a check never scans all of them.

    Priority is the rule id (file order). Rules without a sector are few and kept in
    priority order, with the first one per io type cached. Sector rules live in a list
    sorted by byte offset, searched with bisect: a check looks only at rules whose byte
    lies inside the request.

    Range rules (`sectors`) live in buckets by length, [2**(k-1), 2**k) bytes for bucket k,
    each sorted by start: a range that overlaps [offset, end) starts in
    (offset - 2**k, end), so each bucket is one bisect and a short walk, whatever the number
    of ranges (an interval index that stays a pair of flat arrays per bucket).
    """

    __slots__ = (
        "anywhere",
        "first_anywhere",
        "offsets",
        "at_offset",
        "count",
        "special",
        "ranges",
        "lo",
        "hi",
    )

    def __init__(self) -> None:
        self.replace(())

    def replace(self, rules: Iterable[InjectError]) -> None:
        self.anywhere = []
        located = []
        ranged = []
        special = 0
        for rule in rules:
            if rule.ext is not None:
                special += 1
                if rule.ext.sectors and rule.sector >= 0:
                    ranged.append(rule)
                    continue
            if rule.sector < 0:
                self.anywhere.append(rule)
            else:
                located.append(rule)
        self.anywhere.sort(key=_by_id)
        located.sort(key=_by_offset_then_id)
        # 8 bytes an offset in an array, not a 32-byte int object each in a list
        self.offsets = array("q", [rule.sector * SECTOR_SIZE for rule in located])
        self.at_offset = located
        self._span()
        self.count = len(self.anywhere) + len(located) + len(ranged)
        self.special = special
        # bucket -> (starts in bytes, the rules), both sorted by start
        self.ranges: dict[int, tuple[array[int], list[InjectError]]] = {}
        ranged.sort(key=_by_offset_then_id)
        for rule in ranged:
            starts, rules_ = self.ranges.setdefault(_bucket(rule), (array("q"), []))
            starts.append(rule.sector * SECTOR_SIZE)
            rules_.append(rule)
        self._index_anywhere()

    def add(self, rule: InjectError) -> None:
        if rule.ext is not None:
            self.special += 1
            if rule.ext.sectors and rule.sector >= 0:
                starts, rules = self.ranges.setdefault(_bucket(rule), (array("q"), []))
                start = rule.sector * SECTOR_SIZE
                i = bisect_left(starts, start)
                while i < len(starts) and starts[i] == start and rules[i].id < rule.id:
                    i += 1
                starts.insert(i, start)
                rules.insert(i, rule)
                self.count += 1
                return
        if rule.sector < 0:
            self.anywhere.append(rule)
            self.anywhere.sort(key=_by_id)
            self._index_anywhere()
        else:
            offset = rule.sector * SECTOR_SIZE
            i = bisect_left(self.offsets, offset)
            self.offsets.insert(i, offset)
            self.at_offset.insert(i, rule)
            self._span()
        self.count += 1

    def discard(self, rule: InjectError) -> bool:
        if rule.ext is not None and rule.ext.sectors and rule.sector >= 0:
            found = self._discard_range(rule)
        else:
            found = self._discard_plain(rule)
        if found:
            self.count -= 1
            if rule.ext is not None:
                self.special -= 1
        return found

    def contains(self, rule: InjectError) -> bool:
        if rule.ext is not None and rule.ext.sectors and rule.sector >= 0:
            starts, rules = self.ranges.get(_bucket(rule), ((), ()))
        elif rule.sector < 0:
            return rule in self.anywhere
        else:
            starts, rules = self.offsets, self.at_offset
        start = rule.sector * SECTOR_SIZE
        i = bisect_left(starts, start)
        while i < len(starts) and starts[i] == start:
            if rules[i] is rule:
                return True
            i += 1
        return False

    def _discard_range(self, rule: InjectError) -> bool:
        key = _bucket(rule)
        bucket = self.ranges.get(key)
        if bucket is None:
            return False
        starts, rules = bucket
        start = rule.sector * SECTOR_SIZE
        i = bisect_left(starts, start)
        while i < len(starts) and starts[i] == start:
            if rules[i] is rule:
                del starts[i]
                del rules[i]
                if not rules:
                    del self.ranges[key]
                return True
            i += 1
        return False

    def _discard_plain(self, rule: InjectError) -> bool:
        if rule.sector < 0:
            if rule not in self.anywhere:
                return False
            self.anywhere.remove(rule)
            self._index_anywhere()
        else:
            offset = rule.sector * SECTOR_SIZE
            i = bisect_left(self.offsets, offset)
            while i < len(self.offsets) and self.offsets[i] == offset:
                if self.at_offset[i] is rule:
                    del self.offsets[i]
                    del self.at_offset[i]
                    self._span()
                    break
                i += 1
            else:
                return False
        return True

    def _span(self) -> None:
        """lo, hi: the lowest and highest byte of a sector rule (lo > hi: none), as plain
        ints, so Engine.unseen tells a request that meets none with two comparisons."""
        offsets = self.offsets
        self.lo, self.hi = (offsets[0], offsets[-1]) if offsets else (1 << 63, -1)

    def _index_anywhere(self) -> None:
        first: dict[str, InjectError] = {}
        for rule in self.anywhere:
            for iotype in rule.iotypes:
                first.setdefault(iotype, rule)
            if len(first) == len(IOTYPES):
                break
        self.first_anywhere = first

    def find(self, iotype: str, offset: int, length: int) -> InjectError | None:
        best = self.first_anywhere.get(iotype)
        if length and self.offsets:
            offsets = self.offsets
            i = bisect_left(offsets, offset)
            end = offset + length
            rules = self.at_offset
            while i < len(offsets) and offsets[i] < end:
                rule = rules[i]
                if (best is None or rule.id < best.id) and iotype in rule.iotypes:
                    best = rule
                i += 1
        return best

    def candidates(self, iotype: str | None, offset: int, length: int) -> list[InjectError]:
        """Every rule whose io types allow `iotype` (None: any) and whose span overlaps
        [offset, offset+length) (a rule without sector overlaps everything, a flush
        (length 0) no sector rule), in no particular order."""
        found = [rule for rule in self.anywhere if iotype is None or iotype in rule.iotypes]
        if not length:
            return found
        end = offset + length
        offsets = self.offsets
        if offsets:
            rules = self.at_offset
            i = bisect_left(offsets, offset)
            while i < len(offsets) and offsets[i] < end:
                rule = rules[i]
                if iotype is None or iotype in rule.iotypes:
                    found.append(rule)
                i += 1
        for key, (starts, rules) in self.ranges.items():
            i = bisect_left(starts, offset - (1 << key) + 1)
            while i < len(starts) and starts[i] < end:
                rule = rules[i]
                ext = rule.ext
                assert ext is not None  # a range rule is an extension rule
                if starts[i] + ext.sectors * SECTOR_SIZE > offset and (
                    iotype is None or iotype in rule.iotypes
                ):
                    found.append(rule)
                i += 1
        return found

    def in_priority_order(self) -> list[InjectError]:
        ranged = [rule for _, rules in self.ranges.values() for rule in rules]
        return sorted(self.anywhere + self.at_offset + ranged, key=_by_id)


def _by_id(rule: Rule) -> int:
    return rule.id


def _by_offset_then_id(rule: InjectError) -> tuple[int, int]:
    return (rule.sector, rule.id)


def _bucket(rule: InjectError) -> int:
    """The length class of a range rule: its length in bytes is below 2**_bucket(rule)."""
    ext = rule.ext
    assert ext is not None, "only a range rule (an extension) has a bucket"
    return (ext.sectors * SECTOR_SIZE).bit_length()


def _is_persistent(rule: InjectError) -> bool:
    return rule.ext is not None and rule.ext.persistent


class Engine:
    """QEMU blkdebug's BDRVBlkdebugState and its operations, in Python."""

    def __init__(
        self, rules: Iterable[Rule] = (), *, seed: int | None = None, profile: Profile = DEFAULT
    ):
        self.profile = profile  # whose blkdebug (rules/profiles.py): what errno 0 spends
        # a once rule is spent by a match that lets the request through (errno 0): QEMU 10.0
        self._once_spends_errno0 = profile.once_spends_errno0
        self.state = 1
        self._rules: list[Rule | None] = []  # by id - _first_id; None once removed
        self._first_id = 1
        self._by_event: dict[str, list[Rule]] = {}  # event -> its rules, file order
        self._rule_changes = 0  # counts changes to _by_event (RequestKind caches its answer)
        self._breakpoints: dict[str, list[str]] = {}  # event -> tags, in order set
        self._active = _ActiveSet()
        self._kept = _ActiveSet()  # persistent rules once armed: no event replaces them
        self._plain = True  # no extension rule armed: check takes the QEMU path
        self._persistent_rules = 0  # rules with persistent = "on", armed or not
        self.heal_rules = 0  # rules with heal = "on", armed or not
        self.rules_healed = 0  # heal rules a write removed
        self._tallies: dict[int, Tally] = {}  # rule id -> what it did, from its first request
        # One generator decides every probability, jitter and corruption: a run replays
        # with the same seed and the same request sequence.
        self.seed = secrets.randbits(32) if seed is None else seed
        self.random = random.Random(self.seed)
        self._suspended: list[Suspension] = []  # newest first, as QEMU's QLIST
        self._changed = trio.Event()  # set when suspensions/breakpoints change
        self._hit_waits: dict[int, trio.Event] = {}  # rule id -> set at its next hit
        self._next_id = 1
        self._fired = dict.fromkeys(EVENTS, 0)  # events raised by fire()
        self._kinds: list[RequestKind] = []  # what unseen() let through (event_counts adds it)
        self.errors_injected: dict[int, int] = {}
        self.interrupted = 0  # suspended requests interrupted
        self.last_interrupted: Interrupted | None = None
        # trace.Tracer while a trace is on (it records events and the rules that act); else None
        self.tracer: Any = None
        for rule in rules:
            self._insert(rule)
        self.fire("none")

    # ---- events and checks: the per-request hot path ----

    @property
    def event_counts(self) -> dict[str, int]:
        """How many times each event was raised, by fire() or on the lean path (a new dict)."""
        counts = dict(self._fired)
        for kind in self._kinds:
            for event in kind.events:
                counts[event] += kind.unseen
        return counts

    def request_kind(self, iotype: str, events: tuple[str, ...]) -> "RequestKind":
        """A kind of request for unseen(): checked as `iotype`, raising `events`."""
        kind = RequestKind(iotype, events)
        self._kinds.append(kind)
        return kind

    def fire(self, event: str, request: Request | None = None) -> Suspension | None:
        """Raise `event`. Returns a Suspension the caller must await, or None."""
        self._fired[event] += 1
        if self.tracer is not None:
            self.tracer.event(event)
        rules = self._by_event.get(event)
        if rules:
            self._run_rules(rules)
        if self._breakpoints:
            tags = self._breakpoints.pop(event, None)
            if tags:
                return self._suspend(event, tags, request)
        return None

    def _run_rules(self, rules: list[Rule]) -> None:
        state = self.state
        armed: list[InjectError] = []
        new_state_rule: SetState | None = None
        for rule in rules:
            if rule.state and rule.state != state:
                continue
            if type(rule) is InjectError:
                armed.append(rule)
            elif new_state_rule is None:  # first in file order wins
                new_state_rule = rule  # type: ignore[assignment]  # not narrowed by `type() is`
        if armed:
            if self._persistent_rules:
                armed = self._keep_persistent(armed)
            self._active.replace(armed)
            self._sets_changed()
        if new_state_rule is not None:
            self.state = new_state_rule.new_state
            self._hit(new_state_rule, 0)

    def decide(
        self, iotype: str, offset: int, length: int, caller: Sender | None = None
    ) -> tuple[InjectError | None, int | Effect]:
        """(the rule that acts on this request or None, its outcome): 0 if the request may go
        on, else the errno it fails with, or (extension rules only) an Effect: hold it, then
        fail it or change its data. `length` 0: a flush. The block layer needs the rule itself
        for the torn= and drop-unsynced= extensions."""
        if self._plain:  # QEMU's path: no extension rule armed
            if not self._active.count and self.tracer is None:
                return _PASS  # the common case, first: nothing armed, nobody watching
            rule = self._active.find(iotype, offset, length) if self._active.count else None
            outcome: int | Effect = 0 if rule is None else self._plain_hit(rule)
        else:
            rule, outcome = self._decide_extended(iotype, offset, length, caller)
        if self.tracer is not None:
            self.tracer.checked(iotype, offset, length, rule, outcome)
        return _PASS if rule is None else (rule, outcome)

    def check(
        self, iotype: str, offset: int, length: int, caller: Sender | None = None
    ) -> int | Effect:
        """decide()'s outcome alone (the engine's tests ask this)."""
        return self.decide(iotype, offset, length, caller)[1]

    def _hit(self, rule: Rule, error: int) -> None:
        """A rule acted (failed, passed or changed a request, or set the state): the one place
        that counts it, wakes its wait_hit waiters, tells the tracer and counts the error."""
        rule.hits += 1
        if self._hit_waits:
            self._wake_hit_waits(rule.id)
        if self.tracer is not None:
            self.tracer.rule(rule.id)
        if error:
            self.errors_injected[error] = self.errors_injected.get(error, 0) + 1

    def _plain_hit(self, rule: InjectError) -> int:
        """A QEMU rule met the request: its errno decides (0 lets it through). A once rule is
        spent when it failed it (with errno 0 it stays in QEMU 7.2; 10.0 spends it); a torn
        or drop-unsynced rule with errno 0 still does something, so once spends it too."""
        error = rule.errno
        self._hit(rule, error)
        if rule.once and (
            error or rule.torn >= 0 or rule.drop_unsynced or self._once_spends_errno0
        ):
            self._remove_armed(rule)
        return error

    def unseen(self, kind: "RequestKind", offset: int, length: int) -> bool:
        """The lean path (docs/benchmarks.md): True if nothing can see a request of `kind`
        (request_kind()) at (offset, length): no rule or breakpoint on its events, no trace,
        no extension rule armed, and no armed rule it meets. Then its events are counted as
        fired, exactly as fire() and check() would leave the engine. False: nothing was
        done, the request takes the full path. Every request that no rule can see passes
        here, so each step is as cheap as it can be: one counter per kind of request, and
        the armed sector rules' span (lo, hi) as ints."""
        if self._breakpoints or self.tracer is not None or not self._plain:
            return False
        if kind.rules_seen != self._rule_changes:  # rules were added or removed since
            kind.rules_seen = self._rule_changes
            kind.has_rules = any(event in self._by_event for event in kind.events)
        if kind.has_rules:
            return False
        active = self._active
        if active.count and (
            kind.iotype in active.first_anywhere  # a rule without a sector meets every request
            or (
                offset <= active.hi
                and active.lo < offset + length
                and active.find(kind.iotype, offset, length) is not None
            )
        ):
            return False
        kind.unseen += 1
        return True

    # ---- extension rules: the second path ----

    def _decide_extended(
        self, iotype: str, offset: int, length: int, caller: Sender | None
    ) -> tuple[InjectError | None, int | Effect]:
        rules = self._active.candidates(iotype, offset, length)
        if self._kept.count:
            rules += self._kept.candidates(iotype, offset, length)
            rules.sort(key=_by_id)
        elif len(rules) > 1:
            rules.sort(key=_by_id)
        for rule in rules:
            ext = rule.ext
            if ext is None:  # a QEMU rule decides as it always has
                return rule, self._plain_hit(rule)
            if ext.pid >= 0 or ext.uid >= 0 or ext.comm:
                if not _caller_matches(ext, caller):
                    continue
            if ext.heal and iotype == "write":
                start, end = rule.span
                if offset <= start and end <= offset + length:
                    continue  # a write over the whole span repairs it
            tally = self._tallies.get(rule.id)
            if tally is None:
                tally = self._tallies[rule.id] = Tally()
            tally.seen += 1
            if tally.seen <= ext.after:
                continue
            if ext.probability < 1.0 and self.random.random() >= ext.probability:
                continue
            return rule, self._act(rule, ext, tally, iotype)
        return None, 0

    def _act(self, rule: InjectError, ext: Extensions, tally: Tally, iotype: str) -> int | Effect:
        """What `rule`, which acts on this request, does to it."""
        error = rule.errno
        self._hit(rule, error)
        delay_us = ext.delay_us
        if ext.jitter_us:
            delay_us += self.random.randint(0, ext.jitter_us)
        corrupt = ext.corrupt if iotype == "read" or iotype == "write" else ""
        powercut = ext.powercut
        if not (error or delay_us or corrupt or rule.torn >= 0 or rule.drop_unsynced or powercut):
            return 0  # errno 0: lets it through, as in QEMU
        tally.acted += 1
        if error:
            tally.failed += 1
        if delay_us:
            tally.delayed += 1
        if corrupt:
            tally.corrupted += 1
        if rule.once or tally.acted == ext.count:
            self._remove_armed(rule)
        if not (delay_us or corrupt or powercut):
            return error
        start, end = rule.span
        return Effect(
            error,
            delay_us / 1e6,
            corrupt,
            ext.corrupt_bytes,
            start,
            end,
            self.random.getrandbits(64) if corrupt else 0,
            powercut,
            ext.powercut_save,
        )

    def written(self, offset: int, length: int) -> None:
        """A write of [offset, offset+length) reached the image: armed heal rules whose whole
        span it covers are removed (a bad sector remapped on write, as dm-dust does)."""
        if not self.heal_rules or self._plain:
            return
        end = offset + length
        for rules in (
            self._active.candidates(None, offset, length),
            self._kept.candidates(None, offset, length),
        ):
            for rule in rules:
                if rule.ext is not None and rule.ext.heal:
                    start, stop = rule.span
                    if offset <= start and stop <= end:
                        self._remove_armed(rule)
                        self.rules_healed += 1

    def _keep_persistent(self, armed: list[InjectError]) -> list[InjectError]:
        """Move the persistent rules of `armed` to the kept set; the others are returned."""
        others = []
        for rule in armed:
            if _is_persistent(rule):
                if not self._kept.contains(rule):
                    self._kept.add(rule)
            else:
                others.append(rule)
        return others

    def _remove_armed(self, rule: InjectError) -> None:
        """An armed rule is used up (once, count, heal): out of its active set, and spent."""
        if not self._active.discard(rule):
            self._kept.discard(rule)
        self._retire(rule)
        self._sets_changed()

    def _sets_changed(self) -> None:
        self._plain = not (self._active.special or self._kept.count)

    # ---- breakpoints ----

    def _suspend(self, event: str, tags: list[str], request: Request | None) -> Suspension:
        suspension = Suspension(event, tags, request, self._suspended, self._interrupted)
        if self.tracer is not None:
            self.tracer.suspended(event)
        self._suspended.insert(0, suspension)
        self._notify()
        return suspension

    def _interrupted(self, suspension: Suspension) -> None:
        self.interrupted += 1
        self.last_interrupted = Interrupted(
            tuple(suspension.tags), suspension.event, suspension.request
        )
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def add_breakpoint(self, event: str, tag: str) -> None:
        name = canonical_event(event)
        if name is None:
            raise EngineError(_errno.ENOENT, f'unknown event "{event}"')
        self._breakpoints.setdefault(name, []).append(tag)
        self._notify()

    def resume(self, tag: str) -> None:
        """Take `tag` off the most recently suspended request that has it (QEMU's order)."""
        for suspension in self._suspended:
            if tag in suspension.tags:
                suspension.tags.remove(tag)
                if not suspension.tags:
                    suspension.release()
                self._notify()
                return
        raise EngineError(_errno.ENOENT, f'no request is suspended at tag "{tag}"')

    def remove_breakpoint(self, tag: str) -> None:
        """Drop every breakpoint with `tag` and resume every request suspended at it."""
        found = False
        for event in list(self._breakpoints):
            tags = self._breakpoints[event]
            if tag in tags:
                found = True
                tags[:] = [t for t in tags if t != tag]
                if not tags:
                    del self._breakpoints[event]
        for suspension in list(self._suspended):
            if tag in suspension.tags:
                found = True
                suspension.tags[:] = [t for t in suspension.tags if t != tag]
                if not suspension.tags:
                    suspension.release()
        if not found:
            raise EngineError(_errno.ENOENT, f'no breakpoint or suspended request has tag "{tag}"')
        self._notify()

    def is_suspended(self, tag: str) -> bool:
        return any(tag in s.tags for s in self._suspended)

    def _has_breakpoint(self, tag: str) -> bool:
        return any(tag in tags for tags in self._breakpoints.values())

    async def wait_break(self, tag: str, timeout: float | None = None) -> None:
        """Return once a request is suspended at `tag` (at once if one already is).

        Unlike qemu-io, which would wait forever, a tag that is neither set as a
        breakpoint nor suspended fails with ENOENT: nothing could ever satisfy the wait.
        """
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while not self.is_suspended(tag):
                if not self._has_breakpoint(tag):
                    raise EngineError(
                        _errno.ENOENT, f'no breakpoint or suspended request has tag "{tag}"'
                    )
                await self._changed.wait()
            return
        raise EngineError(
            _errno.ETIMEDOUT, f'no request was suspended at tag "{tag}" within {timeout:g} s'
        )

    def release_suspended(self, failure: OSError | None = None) -> int:
        """A power cut: let every suspended request go on, breakpoints stay set. With
        `failure`, each one raises it when it wakes (it fails, changing nothing more)."""
        suspended = list(self._suspended)
        for suspension in suspended:
            if failure is None:
                suspension.release()
            else:
                suspension.abort(failure)
        if suspended:
            self._notify()
        return len(suspended)

    def resume_all(self) -> None:
        """Shutdown: drop every breakpoint and release every suspended request."""
        self._breakpoints.clear()
        for suspension in list(self._suspended):
            suspension.release()
        self._notify()

    def breakpoints(self) -> list[tuple[str, str]]:
        return [(event, tag) for event, tags in self._breakpoints.items() for tag in tags]

    def suspended(self) -> list[Suspension]:
        return list(self._suspended)

    # ---- rules at runtime ----

    def _insert(self, rule: Rule) -> int:
        rule.id = self._next_id
        self._next_id += 1
        if type(rule) is InjectError and rule.ext is not None:
            self._persistent_rules += rule.ext.persistent
            self.heal_rules += rule.ext.heal
        self._rules.append(rule)
        self._by_event.setdefault(rule.event, []).append(rule)
        self._rule_changes += 1
        return rule.id

    def _lookup(self, rule_id: int) -> Rule | None:
        index = rule_id - self._first_id
        if 0 <= index < len(self._rules):
            return self._rules[index]
        return None

    def _unindex(self, rule: Rule) -> None:
        if type(rule) is InjectError and rule.ext is not None:
            self._persistent_rules -= rule.ext.persistent
            self.heal_rules -= rule.ext.heal
        siblings = self._by_event[rule.event]
        siblings.remove(rule)
        if not siblings:
            del self._by_event[rule.event]
        self._rule_changes += 1

    def _retire(self, rule: Rule) -> None:
        """A used-up rule: no event matches it again, but it stays listed (spent, with its
        hits) until removed or cleared, so a test can still see that it fired."""
        rule.spent = True
        self._unindex(rule)
        if self._hit_waits:  # a wait for a count it can no longer reach ends now
            self._wake_hit_waits(rule.id)

    def _delete(self, rule: Rule) -> None:
        self._rules[rule.id - self._first_id] = None
        self._tallies.pop(rule.id, None)
        if not rule.spent:
            self._unindex(rule)
        self._wake_hit_waits(rule.id)  # its waiters learn that it is gone

    def add_rule(self, rule: Rule) -> int:
        """Add a rule after all others; returns its id.

        `none` fired at mount and never fires again, so an inject-error rule added for it
        (in state 0 or the current state) is armed at once, behind the rules already armed.
        """
        rule_id = self._insert(rule)
        if rule.event == "none" and type(rule) is InjectError and rule.state in (0, self.state):
            (self._kept if _is_persistent(rule) else self._active).add(rule)
            self._sets_changed()
        return rule_id

    def remove_rule(self, rule_id: int) -> None:
        rule = self._lookup(rule_id)
        if rule is None:
            raise EngineError(_errno.ENOENT, f"no rule with id {rule_id}")
        if type(rule) is InjectError:
            if not self._active.discard(rule):
                self._kept.discard(rule)
            self._sets_changed()
        self._delete(rule)

    def clear(self) -> None:
        """Remove every rule and disarm everything; breakpoints stay."""
        self._rules = []
        self._first_id = self._next_id
        self._by_event.clear()
        self._rule_changes += 1
        self._active.replace(())
        self._kept.replace(())
        self._tallies.clear()
        self._persistent_rules = self.heal_rules = 0
        self._sets_changed()
        for rule_id in list(self._hit_waits):
            self._wake_hit_waits(rule_id)

    # ---- waiting for a rule to act ----

    def _wake_hit_waits(self, rule_id: int) -> None:
        event = self._hit_waits.pop(rule_id, None)
        if event is not None:
            event.set()

    async def wait_hit(
        self, rule_id: int, timeout: float | None = None, hits: int | None = None
    ) -> int:
        """Wait until rule `rule_id` has acted; return its hits then.

        "Acted" is when the rule decides a request (fails it, lets it through with errno 0,
        begins a delay rule's hold, changes the state): its hit count grows then, before the
        request is answered. Without `hits`, the wait is for one act more than the rule had
        when the wait began, except for a spent rule (used up by once, count or heal): its
        last act has already begun, so the wait is over at once; a wait issued while a
        count=1 delay rule holds its request returns instead of racing it. With `hits`, the
        wait is until the rule has `hits` hits in all (at once if it has), which is race-free
        for any rule: read its hits, start the I/O, wait for hits + 1.

        ENOENT for an unknown rule, for one removed or cleared while waiting, and for a spent
        rule that cannot reach the count (one healed before it ever acted, say); ETIMEDOUT
        after `timeout` seconds. Costs the request path nothing until a rule acts, then one
        dict lookup while someone waits.
        """
        rule = self._lookup(rule_id)
        if rule is None:
            raise EngineError(_errno.ENOENT, f"no rule with id {rule_id}")
        if hits is not None:
            target = hits
        elif rule.spent and rule.hits:
            return rule.hits  # its last act has begun; it cannot act again
        else:
            target = rule.hits + 1
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                if rule.hits >= target:
                    return rule.hits
                if self._lookup(rule_id) is not rule:
                    raise EngineError(_errno.ENOENT, f"rule {rule_id} was removed while waiting")
                if rule.spent:
                    raise EngineError(
                        _errno.ENOENT,
                        f"rule {rule_id} is spent: it cannot act again (hits={rule.hits}, "
                        f"waited for {target})",
                    )
                event = self._hit_waits.get(rule_id)
                if event is None:
                    event = self._hit_waits[rule_id] = trio.Event()
                await event.wait()
        raise EngineError(
            _errno.ETIMEDOUT,
            f"rule {rule_id} did not act within {timeout:g} s (hits={rule.hits}, "
            f"waited for {target})",
        )

    def set_state(self, state: int) -> None:
        self.state = state

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Reload: new rules, as if the image were opened again (state 1, `none` fired).

        Breakpoints and suspended requests are left as they are.
        """
        self.clear()
        for rule in rules:
            self._insert(rule)
        self.state = 1
        self.random.seed(self.seed)  # a fresh open: the same decisions again
        self._fired["none"] += 1
        rules_of_none = self._by_event.get("none")
        if rules_of_none:
            self._run_rules(rules_of_none)

    def tally(self, rule: Rule) -> Tally:
        """What an extension rule did so far (all zero before a request reached it)."""
        return self._tallies.get(rule.id) or Tally()

    def rules_by_event(self) -> dict[str, list[Rule]]:
        """event -> its rules in file order (read only: the engine's own lists)."""
        return self._by_event

    def rules(self) -> list[Rule]:
        return [rule for rule in self._rules if rule is not None]

    def active(self) -> list[InjectError]:
        if not self._kept.count:
            return self._active.in_priority_order()
        return sorted(self._active.in_priority_order() + self._kept.in_priority_order(), key=_by_id)


def _caller_matches(ext: Extensions, caller: Sender | None) -> bool:
    """Whether the request's sender passes the rule's pid/uid/comm filters. An unknown
    sender (an op without a request context) passes none: a filter is a restriction."""
    if caller is None:
        return False
    if ext.uid >= 0 and caller.uid != ext.uid:
        return False
    if ext.pid >= 0 and caller.pid != ext.pid and caller.process() != ext.pid:
        return False
    if ext.comm and caller.command() != ext.comm:
        return False
    return True


__all__ = [
    "Sender",
    "Effect",
    "Engine",
    "EngineError",
    "Interrupted",
    "Request",
    "Suspension",
    "InjectError",
    "SetState",
]
