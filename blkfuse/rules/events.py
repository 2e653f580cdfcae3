"""Event names and I/O types of QEMU's blkdebug, and nothing else.

The 48 names are QEMU's BlkdebugEvent enum (qapi/block-core.json) in enum order.
Before 2015 a few of them were spelt with a dot; configs written then still work here.
"""

EVENTS = (
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
)

# Pre-2015 spellings (QEMU's old event_names[] table) -> today's names.
EVENT_ALIASES = {
    "l1_grow.alloc_table": "l1_grow_alloc_table",
    "l1_grow.write_table": "l1_grow_write_table",
    "l1_grow.activate_table": "l1_grow_activate_table",
    "l2_alloc.cow_read": "l2_alloc_cow_read",
    "l2_alloc.write": "l2_alloc_write",
    "refblock_alloc.hookup": "refblock_alloc_hookup",
    "refblock_alloc.write": "refblock_alloc_write",
    "refblock_alloc.write_blocks": "refblock_alloc_write_blocks",
    "refblock_alloc.write_table": "refblock_alloc_write_table",
    "refblock_alloc.switch_table": "refblock_alloc_switch_table",
    "pwritev_rmw.head": "pwritev_rmw_head",
    "pwritev_rmw.after_head": "pwritev_rmw_after_head",
    "pwritev_rmw.tail": "pwritev_rmw_tail",
    "pwritev_rmw.after_tail": "pwritev_rmw_after_tail",
}

# The events a request through the mount can raise (docs/design.md, "Events per operation");
# the others are accepted so that configs written for qcow2 stay portable, but never fire here.
REACHABLE_EVENTS = frozenset(
    {
        "none",
        "read_aio",
        "write_aio",
        "pwritev",
        "pwritev_zero",
        "pwritev_done",
        "flush_to_os",
        "flush_to_disk",
        "pwritev_rmw_head",
        "pwritev_rmw_after_head",
        "pwritev_rmw_tail",
        "pwritev_rmw_after_tail",
    }
)


def never_fires_note(event: str) -> str:
    """' (never fires: ...)' for an event no request through a mount raises, else ''.

    The one wording for every place a rule or breakpoint names such an event: `blkfuse check`,
    the answers to `break`, `inject-error` and `set-state`, and the status.
    """
    if event in REACHABLE_EVENTS:
        return ""
    return f' (never fires: no request through a blkfuse mount raises "{event}")'


IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")

# Every io type is reached through a mount, and by which calls (blkfuse's pyfuse3 patch passes
# fallocate and lseek on: scripts/pyfuse3/). `blkfuse events` prints this; a test drives each
# call through a real mount and checks that every io type named here meets its rules.
REACHED_BY = {
    "read": "read(2)",
    "write": "write(2)",
    "write-zeroes": "fallocate ZERO_RANGE",
    "discard": "fallocate PUNCH_HOLE",
    "flush": "fsync(2)",
    "block-status": "lseek SEEK_DATA/SEEK_HOLE",
}
REACHABLE_IOTYPES = frozenset(REACHED_BY)

# QEMU's default when a rule names no iotype: everything but block-status.
DEFAULT_IOTYPES = frozenset(IOTYPES) - {"block-status"}

# Every spelling -> the one string object in EVENTS, so rules share their event names.
_CANONICAL = {name: name for name in EVENTS}
_CANONICAL.update(EVENT_ALIASES)


def canonical_event(name: str) -> str | None:
    """Today's name for an event spelling, or None if there is no such event."""
    return _CANONICAL.get(name)
