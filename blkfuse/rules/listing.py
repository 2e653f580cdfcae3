"""How the vocabulary tables (keys.py, options.py) are listed: aligned help lines for `help` and
--help, Markdown tables for the README. One layout for both tables."""

from collections.abc import Iterable, Sequence


def help_lines(rows: Sequence[tuple[bool, str, str]], max_width: int = 28) -> list[str]:
    """(portable, 'KEY=VALUE', help) rows as aligned lines; what QEMU rejects marked '*'."""
    width = min(max_width, max(len(left) for _, left, _ in rows))
    return [f"{' ' if portable else '*'} {left:<{width}}  {text}" for portable, left, text in rows]


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; '|' inside a cell is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
