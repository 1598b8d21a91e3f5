"""Training stage: the loop (loop.py), resume state, recipe resolution, data stream, validation."""
