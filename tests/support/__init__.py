"""What the tests share: the block device builder (device.py); the lead adds the rest."""
