"""Converters from the official raw downloads to the prepared layout, one module per
dataset; `dpseg.data.datasets` registers them by name."""
