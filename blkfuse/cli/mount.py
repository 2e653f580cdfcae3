"""`blkfuse mount [OPTIONS] IMAGE MOUNTPOINT`: mount an image behind blkdebug's rule engine."""

import os
import sys

import click

from blkfuse.cli._common import fail
from blkfuse.rules import keys, options


def _epilog() -> str:
    """Examples, then every -o option and rule key, from their tables (rules/options.py,
    rules/keys.py)."""
    lines = [
        "\b",
        "Examples:",
        "  blkfuse mount --config rules.conf disk.img /mnt/faulty",
        "  blkfuse mount -o inject-error.0.event=read_aio,inject-error.0.sector=8 disk.img "
        "/mnt/faulty",
        "  blkfuse mount blkdebug:rules.conf:disk.img /mnt/faulty      # QEMU's spelling",
        "  blkfuse mount -o growable=on,locking=off disk.img /mnt/faulty",
        "  blkfuse mount -o log-writes=disk.log disk.img /mnt/faulty   # record; blkfuse replay",
        "",
        "\b",
        "-o options (* not portable: QEMU's blkdebug rejects it):",
        *(f"  {line}" for line in options.help_lines()),
    ]
    for kind in keys.KINDS:
        lines += [
            "",
            "\b",
            f"-o {kind}.N.KEY=VALUE: rule N (from 0), as a [{kind}] section; its keys:",
            *(f"  {line}" for line in keys.help_lines(kind)),
        ]
    return "\n".join(lines)


@click.command("mount", epilog=_epilog())
@click.option(
    "--config", "config_path", metavar="RULES", help="blkdebug config file (QEMU's format)."
)
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="KEY=VALUE,...",
    help="QEMU blockdev-style options, e.g. "
    "inject-error.0.event=read_aio,inject-error.0.errno=28,align=4096 "
    "(repeatable; option rules come after config rules; every option and key is "
    "listed below).",
)
@click.option("--name", help="Name of the image file in the mount (default: the image's).")
@click.option(
    "--allow-other",
    is_flag=True,
    help="Let other users use the mount (control stays writable by you and root).",
)
@click.option("--read-only", is_flag=True, help="Refuse writes (EROFS).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground until unmounted.")
@click.option("--log", "log_file", metavar="FILE", help="Log to FILE.")
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    help="Append one JSON line per image request to FILE (see `blkfuse trace`).",
)
@click.argument("image", metavar="IMAGE")
@click.argument("mountpoint", metavar="MOUNTPOINT")
def command(
    config_path: str | None,
    options: tuple[str, ...],
    name: str | None,
    allow_other: bool,
    read_only: bool,
    foreground: bool,
    log_file: str | None,
    trace_file: str | None,
    image: str,
    mountpoint: str,
) -> None:
    """Mount IMAGE at MOUNTPOINT as a directory holding the image file and `control`.

    IMAGE may also be QEMU's `blkdebug:RULES:IMAGE` (RULES may be empty). Returns once the
    mount is live (the daemon stays in the background unless --foreground); on failure
    prints one line and exits 1 with nothing mounted.
    """
    from blkfuse.daemon.lifecycle import MountError, prepare, run_background, run_foreground
    from blkfuse.rules import config

    try:
        rules_from_name, image = config.parse_filename(image)
        merged = {}
        for o in options:
            merged.update(config.parse_option_string(o))
        configs = [c for c in (config_path, rules_from_name, merged.get("config")) if c]
        if len(set(configs)) > 1:
            fail(
                "more than one rules file given (--config, blkdebug:RULES:, -o config=): "
                + ", ".join(configs)
            )
        if configs:
            merged["config"] = os.path.abspath(configs[0])
        for key in ("image", "x-image"):
            given = merged.pop(key, None)
            if given and os.path.abspath(given) != os.path.abspath(image):
                fail(f"-o {key}={given} names another image than {image}")
        _, settings = config.parse_options(merged)
        m = prepare(
            image,
            mountpoint,
            settings,
            name=name,
            read_only=read_only,
            allow_other=allow_other,
            log_file=log_file,
            trace_file=trace_file,
        )
    except config.ConfigError as e:
        fail(str(e))
    except MountError as e:
        fail(str(e))

    try:
        if foreground:
            sys.exit(run_foreground(m))
        run_background(m)
    except MountError as e:
        fail(str(e))
