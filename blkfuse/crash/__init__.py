"""Power cuts and crash states: the undo log, snapshots, write logs (record, replay), crashtest."""
