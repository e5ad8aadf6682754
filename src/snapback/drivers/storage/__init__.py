"""Storage pools: the StoragePool port and its drivers (``local``; ``rbd`` later)."""
