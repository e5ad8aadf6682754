"""Domain layer: models, states, errors and rules. Imports nothing else of ours and does no I/O."""
