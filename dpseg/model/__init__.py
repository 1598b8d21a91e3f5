"""The DPSeg network: cost volumes, decoder, loss."""

from dpseg.model.checkpoint import load_dpseg, read_checkpoint_config, save_dpseg
from dpseg.model.config import CONFIG_VERSION, DPSegConfig
from dpseg.model.decoder import PassContext
from dpseg.model.loss import deep_supervision_bce, segmentation_bce
from dpseg.model.network import DPSeg, build_dpseg
from dpseg.model.prompts import VisualPrompts

__all__ = [
    "CONFIG_VERSION",
    "DPSegConfig",
    "DPSeg",
    "PassContext",
    "build_dpseg",
    "load_dpseg",
    "read_checkpoint_config",
    "save_dpseg",
    "VisualPrompts",
    "segmentation_bce",
    "deep_supervision_bce",
]
