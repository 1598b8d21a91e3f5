"""Evaluation stage: two-pass loop (loop.py), setup, segment, report, panels."""
