"""The five LivePortrait sub-networks, written for this project and keyed like the official checkpoints."""
from __future__ import annotations

from .appearance import AppearanceFeatureExtractor
from .motion import MotionExtractor
from .spade import SPADEDecoder
from .stitching import StitchingRetargetingNetwork
from .warping import WarpingNetwork

__all__ = ["AppearanceFeatureExtractor", "MotionExtractor", "WarpingNetwork", "SPADEDecoder",
           "StitchingRetargetingNetwork"]
