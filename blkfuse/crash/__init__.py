"""Power cuts and crash states: the undo log of unsynced writes."""
