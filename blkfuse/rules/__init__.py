"""The blkdebug vocabulary: events, rules and settings, and the parsers of QEMU's syntax."""
