"""Benchmarks: `dpseg bench model|bank|train|eval|all` (JSON results)."""
