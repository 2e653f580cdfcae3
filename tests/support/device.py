"""One way for a test to build a block device: as the daemon does (block/stack.py), from
Settings given as keywords, over a real backing file."""

import os

from blkfuse.block.device import BlockDevice
from blkfuse.block.image import Image
from blkfuse.block.stack import build_stack, open_image
from blkfuse.engine.core import Engine
from blkfuse.rules.model import Settings


def build_device(
    path: str | os.PathLike,
    engine: Engine | None = None,
    *,
    settings: Settings | None = None,
    rules=(),
    seed=None,
    **options,
) -> BlockDevice:
    """The BlockDevice a mount of `path` with these settings (or options: Settings fields
    as keywords, align=, cache=, track_unsynced=, ...) would have; over `engine`, or a new
    one with `rules`. Its nodes: device.stack (device.stack.image is the backing file)."""
    if settings is None:
        settings = Settings(**options)
    if engine is None:
        engine = Engine(list(rules), seed=seed)
    return device_for(engine, open_image(str(path), settings), settings)


def device_for(engine: Engine, image: Image, settings: Settings) -> BlockDevice:
    """The BlockDevice over an image already open, as the daemon builds it."""
    return BlockDevice.from_settings(engine, build_stack(settings, image), settings)
