"""The DPSeg network: cost volumes, decoder, loss."""

from dpseg.model.checkpoint import load_dpseg, save_dpseg
from dpseg.model.config import DPSegConfig
from dpseg.model.loss import segmentation_bce
from dpseg.model.network import DPSeg, build_dpseg
from dpseg.model.prompts import VisualPrompts

__all__ = ["DPSegConfig", "DPSeg", "build_dpseg", "load_dpseg", "save_dpseg", "VisualPrompts", "segmentation_bce"]
