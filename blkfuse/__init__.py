"""blkfuse: QEMU blkdebug's fault-injection rule engine behind a FUSE-mounted disk image."""

__version__ = "0.1.0"
