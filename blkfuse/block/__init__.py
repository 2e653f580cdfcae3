"""QEMU's block layer around blkdebug, and the nodes below it down to the backing file."""
