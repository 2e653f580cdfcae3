"""`blkfuse.mounttab` for existing users: the module itself lives in blkfuse.client.mounttab.
Aliased rather than re-exported, so both names are one module (patching one patches both)."""

import sys

from blkfuse.client import mounttab as _mounttab

sys.modules[__name__] = _mounttab
