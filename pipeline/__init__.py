"""The stages as functions (bank, train, evaluate), benchmarks and reports."""
