"""`dpseg app`: a local web page around a loaded checkpoint (runner.py: what Run does; page.py:
the Gradio page; bench.py: time from Run to both overlays)."""
