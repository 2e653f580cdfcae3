"""`blkfuse log LOG [--json]`: the entries of a dm-log-writes log and a summary."""

import json
from collections.abc import Iterable

import click

from blkfuse.cli._common import fail
from blkfuse.crash.logwrites import LogEntry, LogFormatError, read_log


def summarize(entries: Iterable[LogEntry], sectorsize: int) -> dict[str, int]:
    """Counts over the entries; `bytes`: the data the writes carry."""
    summary = {"entries": 0, "writes": 0, "flushes": 0, "fua": 0, "discards": 0, "marks": 0}
    total = 0
    for entry in entries:
        summary["entries"] += 1
        summary["writes"] += entry.is_write
        summary["flushes"] += entry.is_flush
        summary["fua"] += entry.is_fua
        summary["discards"] += entry.is_discard
        summary["marks"] += entry.is_mark
        if entry.is_write:
            total += entry.nr_sectors * sectorsize
    summary["bytes"] = total
    return summary


@click.command(
    "log",
    epilog="""\b
Examples:
  blkfuse log disk.log
  blkfuse log --json disk.log | jq '.entries[] | select(.mark)'""",
)
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Entries and summary as JSON.")
@click.option(
    "--trailing",
    is_flag=True,
    help="Also list whole entries after the superblock's count (a daemon killed between flushes).",
)
def command(log: str, as_json: bool, trailing: bool) -> None:
    """List the entries of a dm-log-writes LOG (index, sector, sectors, flags, mark) and
    a summary. Sectors count the log's sector size."""
    try:
        superblock, entries = read_log(log, data=False, trailing=trailing)
        listed = list(entries)
    except LogFormatError as error:
        fail(str(error))
    except OSError as error:
        fail(f"{log}: {error.strerror}")
    summary = summarize(listed, superblock.sectorsize)
    if as_json:
        document = {
            "sectorsize": superblock.sectorsize,
            "nr_entries": superblock.nr_entries,
            "entries": [
                {
                    "index": e.index,
                    "sector": e.sector,
                    "nr_sectors": e.nr_sectors,
                    "flags": e.flags_text.split("|") if e.flags else [],
                    "mark": e.mark,
                }
                for e in listed
            ],
            "summary": summary,
        }
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"{'INDEX':>7} {'SECTOR':>12} {'SECTORS':>8}  FLAGS")
    for e in listed:
        mark = f"  {e.mark}" if e.mark is not None else ""
        click.echo(f"{e.index:>7} {e.sector:>12} {e.nr_sectors:>8}  {e.flags_text}{mark}")
    click.echo(
        f"log sector size {superblock.sectorsize}: {summary['entries']} entries, "
        f"{summary['writes']} writes, {summary['flushes']} flushes, {summary['fua']} FUA, "
        f"{summary['discards']} discards, {summary['marks']} marks, {summary['bytes']} bytes"
    )
