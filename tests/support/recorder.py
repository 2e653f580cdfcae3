"""A test double on the engine's tracer hooks (engine.tracer): it sees every event and every
check the block layer makes, whatever path production code takes (the engine reports them;
nothing in production branches for it)."""

from blkfuse.engine.core import Engine


class Recorder:
    """Events and checks in the order they happen: `trace` holds event names and
    (iotype, offset, length) per check; `checks` (iotype, errno) per check."""

    def __init__(self, engine: Engine | None = None):
        self.trace: list = []
        self.checks: list[tuple[str, int]] = []
        self.rules: list[int] = []  # ids of the rules that acted, in order
        if engine is not None:
            engine.tracer = self

    def event(self, name: str) -> None:
        self.trace.append(name)

    def checked(self, iotype, offset, length, rule, outcome) -> None:
        self.trace.append((iotype, offset, length))
        self.checks.append((iotype, outcome if isinstance(outcome, int) else outcome.errno))

    def rule(self, rule_id: int) -> None:
        self.rules.append(rule_id)

    def suspended(self, event: str) -> None:
        pass

    def clear(self) -> None:
        self.trace.clear()
        self.checks.clear()
        self.rules.clear()
