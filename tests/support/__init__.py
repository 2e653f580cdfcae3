"""What the tests share: the block device builder as the daemon builds it (device.py) and a
recorder on the engine's tracer hooks (recorder.py). I/O on a mounted image: tests/imageio.py."""
