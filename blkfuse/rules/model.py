"""Rule objects: what a parsed config line becomes and what the engine acts on.

Plain slotted data, so that 100,000 rules stay small (QEMU's BlkdebugRule is a union of
three small structs; these are its Python twins). Parsing lives in config.py, behaviour in
engine.py.
"""

import errno as _errno
from dataclasses import dataclass, field

from blkfuse.rules.events import DEFAULT_IOTYPES

SECTOR_SIZE = 512


@dataclass(slots=True, eq=False)
class InjectError:
    """`[inject-error]`: when `event` fires in `state` (0 = any), arm this rule."""

    event: str
    state: int = 0
    errno: int = _errno.EIO
    sector: int = -1  # -1: any offset; else the one byte sector*512
    once: bool = False
    immediately: bool = False
    iotypes: frozenset = DEFAULT_IOTYPES
    origin: str = ""  # where it came from: a config path, "-o inject-error.0", "control"
    line: int = 0  # the line in `origin`, 0 if none
    id: int = 0  # given by the engine; also its priority (lower wins)
    hits: int = 0  # times this rule failed (or, errno 0, passed) a request
    spent: bool = False  # used up (once): listed with its hits, never matched again
    # blkfuse extensions for power cuts (issue 10; QEMU rejects these keys):
    torn: int = -1  # a write it fails keeps its first `torn` sectors; -1: off
    drop_unsynced: bool = False  # a flush it fails first reverts the unsynced writes
    ext: "Extensions | None" = None  # blkfuse's other keys beyond blkdebug's; None: QEMU rule

    kind = "inject-error"

    # "rules.conf:3" is built when shown: one shared path and an int per rule, not a
    # string per rule, keeps 100,000 rules ~10 MB smaller.
    @property
    def source(self) -> str:
        return _source(self.origin, self.line)

    @property
    def offset(self) -> int:
        """The byte a sector rule tests, or -1."""
        return self.sector * SECTOR_SIZE if self.sector >= 0 else -1

    @property
    def span(self) -> tuple[int, int]:
        """The bytes [start, end) a request must overlap to match: QEMU's one byte at
        sector*512, or with `sectors` whole sectors; (0, 2**63) for a rule without sector."""
        if self.sector < 0:
            return 0, ANYWHERE_END
        start = self.sector * SECTOR_SIZE
        sectors = self.ext.sectors if self.ext is not None else 0
        return start, (start + sectors * SECTOR_SIZE if sectors else start + 1)


ANYWHERE_END = 2**63


# What a rule may do to a request besides failing it.
CORRUPT_MODES = ("flip", "zero", "random")
# What a power cut keeps of the unsynced writes (crash/undo.py): the powercut command's keep=
# and the powercut rule key.
POWERCUT_MODES = ("none", "random", "prefix")


@dataclass(slots=True, frozen=True)
class Extensions:
    """The keys blkfuse adds to [inject-error] (README "Beyond blkdebug").

    Kept apart so that a QEMU rule pays one empty slot for them, and so that the engine
    can tell at a glance that a rule needs more than blkdebug's check (`rule.ext is None`).
    Immutable and shared: 100,000 bad ranges spelt alike hold one (config.py interns them);
    what each rule did is its Tally, kept by the engine.
    """

    probability: float = 1.0  # acts on a request that reaches it with this chance
    after: int = 0  # lets the first N requests that reach it through
    count: int = 0  # acts on at most N requests, then is spent; 0: no limit
    sectors: int = 0  # with sector: covers [sector, sector+N); 0: QEMU's one byte
    delay_us: int = 0  # holds the request this long ...
    jitter_us: int = 0  # ... plus uniformly up to this much
    corrupt: str = ""  # "", or one of CORRUPT_MODES
    corrupt_bytes: int = 1  # bytes changed per corrupted request
    pid: int = -1  # only requests sent by this process (or thread); -1: any
    comm: str = ""  # only requests sent by this command name; "": any
    uid: int = -1  # only requests sent by this user; -1: any
    heal: bool = False  # a successful write over the whole span removes the rule
    persistent: bool = False  # stays armed when later events replace the active set
    powercut: str = ""  # cuts the power at the request it acts on, keeping this; "": no
    powercut_save: str = ""  # ... and saves a sparse copy of the image as the cut left it


@dataclass(slots=True, eq=False)
class Tally:
    """What an extension rule did: `seen` requests reached it (for `after`), it `acted` on
    some, failing, delaying or corrupting them (for `count` and `once`)."""

    seen: int = 0
    acted: int = 0
    failed: int = 0
    delayed: int = 0
    corrupted: int = 0


@dataclass(slots=True, eq=False)
class SetState:
    """`[set-state]`: when `event` fires in `state` (0 = any), move to `new_state`."""

    event: str
    state: int = 0
    new_state: int = 0
    origin: str = ""
    line: int = 0
    id: int = 0
    hits: int = 0  # times this rule changed the state
    spent: bool = False  # (set-state rules are never used up; kept for symmetry)

    kind = "set-state"

    @property
    def source(self) -> str:
        return _source(self.origin, self.line)


def _source(origin: str, line: int) -> str:
    return f"{origin}:{line}" if line else origin


Rule = InjectError | SetState


# qemu-io's -t cache modes, and the layers over blkdebug (raw: -f raw; none: blkdebug alone,
# as --image-opts driver=blkdebug).
CACHE_MODES = ("writeback", "writethrough", "directsync", "none", "unsafe")
FORMATS = ("raw", "none")


@dataclass(slots=True)
class Settings:
    """Everything a mount's rules come from: what `reload` re-reads, and the block options."""

    config_path: str | None = None  # the config file, re-read by `reload`
    options: dict = field(default_factory=dict)  # blockdev-style options as given, in order
    image: str | None = None  # from the blkdebug:RULES:IMAGE form
    align: int | None = None
    max_transfer: int | None = None
    opt_write_zero: int | None = None
    max_write_zero: int | None = None
    opt_discard: int | None = None
    max_discard: int | None = None
    cache: str = "writeback"  # qemu-io -t: writeback writethrough directsync none unsafe
    format: str = "raw"  # raw: raw node over blkdebug; none: blkdebug on top
    # blkfuse's own mount options (not blkdebug's): -o nonempty, locking=off, growable=on
    nonempty: bool = False  # mount over a directory that has entries
    locking: bool = True  # QEMU's locking=on: lock the image (lock.py)
    growable: bool = False  # like qsd's FUSE export: writes past the end, truncate
    # power cuts (blkfuse extensions): the undo log, its cap, the unit a random cut keeps
    track_unsynced: bool = False
    unsynced_cap: int | None = None
    atomic: int | None = None
    io_threads: int | None = None  # -o io-threads: worker threads for disk I/O (image.py)
    poll_us: int | None = None  # -o poll-us: busy-poll window for /dev/fuse (fuseloop.py)
    seed: int | None = None  # -o seed: the one random generator's seed; None: random
    qemu: str = "7.2"  # -o qemu: whose blkdebug and block layer to follow (profiles.py)
    # -o log-writes=FILE: record every change and flush (crash/recorder.py), with QEMU
    # blklogwrites' options
    log_writes: str | None = None
    log_sector_size: int | None = None
    log_append: bool = False
    log_super_update_interval: int | None = None
