"""Per-request trace: one JSON object per image request, to a file and/or live readers.

    {"time": 1764625541.123456, "op": "write", "offset": 0, "length": 4096,
     "pid": 1234, "comm": "dd", "events": ["write_aio", "pwritev", "pwritev_done"],
     "rules": [3], "errno": 28, "us": 41}            (+ "suspended_at": "write_aio")

`time` is when the request reached the block layer (Unix seconds), `op` its io type name,
`events` what it raised in order, `rules` the ids of the rules that acted on it (a set-state
rule that changed the state, an inject-error rule that decided its check), `errno` 0 on
success, `us` the microseconds it spent in the daemon (a breakpoint's hold included),
`suspended_at` the event a breakpoint held it at. `pid`/`comm` come from the FUSE request's
caller when the FUSE layer passes one (comm read once per pid from /proc).

Off costs one `is None` test per event in the engine: the FUSE layer then holds the plain
BlockDevice, and gets the TracedBlock only while tracing is on (`on_switch`). It is on while `--trace FILE` is given or a live reader is attached: the `trace`
control command turns the handle that wrote it into a stream whose reads block until records
come (at most HEARTBEAT seconds, then a bare newline, so a reader blocked in read(2) can always
be interrupted), and end (EOF) when the mount shuts down.
"""

import collections
import contextvars
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blkfuse.block.device import fallocate_iotype
from blkfuse.daemon.callers import command_name

# The op names are the io type names (events.IOTYPES).
_OPS = {
    "read": "read",
    "write": "write",
    "flush": "flush",
    "discard": "discard",
    "write_zeroes": "write-zeroes",
    "block_status": "block-status",
}


HEARTBEAT = 0.5  # seconds a stream read waits before answering a bare newline
STREAM_BACKLOG = 100_000  # records kept for a reader that falls behind; older ones are dropped

_encode = json.JSONEncoder(separators=(",", ":")).encode

_current: contextvars.ContextVar["Record | None"] = contextvars.ContextVar(
    "blkfuse_trace", default=None
)


class Record:
    __slots__ = (
        "time",
        "op",
        "offset",
        "length",
        "caller",
        "events",
        "rules",
        "suspended_at",
        "start",
    )

    def __init__(self, op: str, offset: int, length: int, caller: Any) -> None:
        self.time = time.time()
        self.start = time.perf_counter_ns()
        self.op = op
        self.offset = offset
        self.length = length
        self.caller = caller
        self.events: list[str] = []
        self.rules: list[int] = []
        self.suspended_at: str | None = None


class Stream:
    """One live reader (a control handle after `trace`): records queued as JSON lines."""

    def __init__(self, tracer: "Tracer") -> None:
        self._tracer = tracer
        self._lines: collections.deque[bytes] = collections.deque(maxlen=STREAM_BACKLOG)
        self._pending = b""
        self._dropped = 0
        self._wakeup = trio.Event()
        self.closed = False

    def put(self, line: bytes) -> None:
        if len(self._lines) == self._lines.maxlen:
            self._dropped += 1
        self._lines.append(line)
        self._wakeup.set()

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes of whole or partial lines; a bare newline after HEARTBEAT s
        without records; b"" once closed."""
        if not self._pending and not self._lines and not self.closed:
            with trio.move_on_after(HEARTBEAT):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
        if not self._pending:
            if self._dropped:
                self._pending = json.dumps({"dropped": self._dropped}).encode() + b"\n"
                self._dropped = 0
            chunks, n = [], 0
            while self._lines and n < size:
                line = self._lines.popleft()
                chunks.append(line)
                n += len(line)
            self._pending += b"".join(chunks)
        if not self._pending:
            return b"" if self.closed else b"\n"
        out, self._pending = self._pending[:size], self._pending[size:]
        return out

    def close(self) -> None:
        """Stop (the handle was released, or the mount shuts down): readers get EOF."""
        if not self.closed:
            self.closed = True
            self._wakeup.set()
            self._tracer._detach(self)


class Tracer:
    """Collects one Record per request while on; the engine reports into the current one."""

    def __init__(
        self, engine: Any, path: str | None = None, on_switch: Callable[[bool], None] | None = None
    ) -> None:
        self.engine = engine
        self.on_switch = on_switch  # called with True/False when tracing turns on/off
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self._streams: set[Stream] = set()
        self._comm: dict[int, str] = {}
        self.active = False
        self._update()

    def _update(self) -> None:
        active = self._fd is not None or bool(self._streams)
        self.engine.tracer = self if active else None
        if active != self.active:
            self.active = active
            if self.on_switch is not None:
                self.on_switch(active)

    # -- readers ----------------------------------------------------------------------------

    def open_stream(self) -> Stream:
        stream = Stream(self)
        self._streams.add(stream)
        self._update()
        return stream

    def _detach(self, stream: Stream) -> None:
        self._streams.discard(stream)
        self._update()

    def end_streams(self) -> None:
        """Shutdown begins: every live reader gets end of file (the file keeps recording
        the requests still in flight)."""
        for stream in list(self._streams):
            stream.close()

    def close(self) -> None:
        """The daemon is done: end every stream, close the file."""
        self.end_streams()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._update()

    # -- what the engine reports (only while on) -----------------------------------------------

    def event(self, name: str) -> None:
        record = _current.get()
        if record is not None:
            record.events.append(name)

    def rule(self, rule_id: int) -> None:
        """A rule acted on the request (engine._hit): failed, held, changed or passed it."""
        record = _current.get()
        if record is not None and rule_id not in record.rules:
            record.rules.append(rule_id)

    def checked(self, iotype: str, offset: int, length: int, rule: Any, outcome: Any) -> None:
        """Every check (engine.decide), whatever its outcome: the trace keeps requests and the
        rules that acted (rule above), not each check of a request's pieces."""

    def suspended(self, event: str) -> None:
        record = _current.get()
        if record is not None and record.suspended_at is None:
            record.suspended_at = event

    # -- one request ----------------------------------------------------------------------------

    async def run(
        self, op: str, offset: int, length: int, caller: Any, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        record = Record(op, offset, length, caller)
        token = _current.set(record)
        error = 0
        try:
            return await call()
        except OSError as e:
            error = e.errno or 0
            raise
        finally:
            _current.reset(token)
            self._emit(record, error)

    def _emit(self, record: Record, error: int) -> None:
        # Formatted by hand: about 3x cheaper than json.dumps of a dict, and every field but
        # comm is a number or an op/event name (nothing to escape).
        pid = getattr(record.caller, "pid", None)
        who = ""
        if pid:
            comm = self._comm_of(pid)
            who = f',"pid":{pid}' + (f',"comm":{_encode(comm)}' if comm else "")
        events = ",".join(['"' + e + '"' for e in record.events])
        rules = ",".join(map(str, record.rules))
        held = "" if record.suspended_at is None else f',"suspended_at":"{record.suspended_at}"'
        us = (time.perf_counter_ns() - record.start) // 1000
        line = (
            f'{{"time":{record.time:.6f},"op":"{record.op}","offset":{record.offset},'
            f'"length":{record.length}{who},"events":[{events}],"rules":[{rules}],'
            f'"errno":{error},"us":{us}{held}}}\n'
        ).encode()
        if self._fd is not None:
            os.write(self._fd, line)
        for stream in self._streams:
            stream.put(line)

    def _comm_of(self, pid: int) -> str | None:
        comm = self._comm.get(pid)
        if comm is None:
            comm = command_name(pid)
            if comm is None:
                return None
            if len(self._comm) > 4096:  # pids are reused; keep the cache small
                self._comm.clear()
            self._comm[pid] = comm
        return comm


class TracedBlock:
    """A BlockDevice whose requests are traced; everything else (size, truncate, ...) is
    the device's own. Methods the device lacks stay absent. Used only while tracing is on."""

    def __init__(self, block: Any, tracer: Tracer) -> None:
        self._block = block
        self._tracer = tracer
        for method in ("discard", "write_zeroes", "block_status"):
            if hasattr(block, method):
                setattr(self, method, self._ranged(method, getattr(block, method)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)

    # A traced request is seen: never the device's lean path.
    def read_now(self, offset: int, length: int) -> None:
        return None

    def write_now(self, offset: int, data: Any, **kw: Any) -> None:
        return None

    async def read_unseen(self, offset: int, length: int) -> None:
        return None

    async def read(self, offset: int, length: int, **kw: Any) -> Any:
        return await self._tracer.run(
            "read", offset, length, kw.get("caller"), lambda: self._block.read(offset, length, **kw)
        )

    async def write(self, offset: int, data: Any, **kw: Any) -> Any:
        return await self._tracer.run(
            "write",
            offset,
            len(data),
            kw.get("caller"),
            lambda: self._block.write(offset, data, **kw),
        )

    async def flush(self, **kw: Any) -> Any:
        return await self._tracer.run(
            "flush", 0, 0, kw.get("caller"), lambda: self._block.flush(**kw)
        )

    async def fallocate(self, mode: int, offset: int, length: int, **kw: Any) -> Any:
        """fallocate(2): PUNCH_HOLE is a discard, the other modes write zeroes."""
        op = fallocate_iotype(mode)
        return await self._tracer.run(
            op,
            offset,
            length,
            kw.get("caller"),
            lambda: self._block.fallocate(mode, offset, length, **kw),
        )

    async def seek(self, offset: int, whence: int, **kw: Any) -> Any:
        """SEEK_DATA/SEEK_HOLE: a block-status query from `offset` (length 0)."""
        return await self._tracer.run(
            "block-status",
            offset,
            0,
            kw.get("caller"),
            lambda: self._block.seek(offset, whence, **kw),
        )

    def _ranged(
        self, method: str, inner: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        """A traced (offset, length, ...) op, for the ops the device may have."""
        op = _OPS[method]
        tracer = self._tracer

        async def traced(offset: int, length: int, *args: Any, **kw: Any) -> Any:
            return await tracer.run(
                op, offset, length, kw.get("caller"), lambda: inner(offset, length, *args, **kw)
            )

        traced.__name__ = method
        return traced
