"""The click group of the `blkfuse` command (blkfuse.cli.run hands it what the fast path
does not take)."""

import importlib

import click

from blkfuse.cli import SUBCOMMANDS


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `blkfuse check` never loads pyfuse3."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = SUBCOMMANDS.get(name)
        if module is None:
            return None
        return importlib.import_module(f"blkfuse.cli.{module}").command


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  blkfuse check rules.conf
  blkfuse mount --config rules.conf disk.img /mnt/faulty
  blkfuse ctl /mnt/faulty break write_aio A
  blkfuse status /mnt/faulty
  blkfuse umount /mnt/faulty

"blkfuse COMMAND --help" shows each command's options and examples.""",
)
@click.version_option(package_name="blkfuse")
def main() -> None:
    """Inject disk faults the way QEMU's blkdebug does, into any program.

    blkfuse mounts a disk image as a single file; every read, write and fsync of that
    file runs through blkdebug's rule engine before it reaches the image.
    """
