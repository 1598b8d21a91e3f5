"""dpseg: the model library (CLIP towers, templates, cost volumes, decoder, losses).

Nothing here reads or writes a bank on disk: it receives tensors.
"""

__version__ = "0.1.0"
