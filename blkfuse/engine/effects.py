"""What a rule does to a request besides failing it: hold it, change its data, or cut the
power at it.

The engine decides (engine.check returns an Effect: how long to hold the request, whether it
then fails, which corruption); block.py carries it out, since only it has the data. Corruption
positions come from a seed drawn at decision time, so the same seed and the same request
sequence change the same bytes whatever order concurrent requests finish in.
"""

import random
from typing import NamedTuple, TypeVar


class Effect(NamedTuple):
    """The outcome of an extension rule that delays or corrupts (a bare errno stays an int)."""

    errno: int  # after the delay: 0, the request goes on; else it fails with this
    delay: float  # seconds to hold the request (0: not held)
    corrupt: str  # "" or a mode of rules.CORRUPT_MODES
    corrupt_bytes: int  # how many bytes to change
    start: int  # the bytes the rule covers (its span): corruption stays inside
    end: int
    seed: int  # the positions' and values' generator seed
    powercut: str = ""  # cut the power right there (after the delay), keeping this
    powercut_save: str = ""  # where to save a copy of the image as the cut left it


_Data = TypeVar("_Data", bound=bytes | bytearray | memoryview)  # returned as given when untouched


def corrupt(data: _Data, data_offset: int, effect: Effect, start: int, end: int) -> _Data | bytes:
    """`data` (the bytes at [data_offset, data_offset+len(data))) with effect.corrupt_bytes
    bytes changed, all inside [start, end) and the rule's span; `data` itself is untouched.

    flip: one bit of each chosen byte; zero: the byte becomes 0 (a byte already 0 stays so);
    random: a different random value.
    """
    low = max(start, effect.start, data_offset)
    high = min(end, effect.end, data_offset + len(data))
    if high <= low:
        return data
    rng = random.Random(effect.seed)
    changed = bytearray(data)
    positions = rng.sample(range(low, high), min(effect.corrupt_bytes, high - low))
    mode = effect.corrupt
    for position in positions:
        i = position - data_offset
        if mode == "flip":
            changed[i] ^= 1 << rng.randrange(8)
        elif mode == "zero":
            changed[i] = 0
        else:
            changed[i] ^= rng.randrange(1, 256)
    return bytes(changed)
