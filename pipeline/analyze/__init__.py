"""Analyses: modality gap, cost heatmaps, ablation sweeps, plots."""
