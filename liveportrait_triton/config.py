"""Network hyper-parameters: the official `models.yaml` values ("full") and a reduced "tiny" variant.

The tiny configuration keeps every tensor name, the 256x256 input, the 64x64 feature grid, the 21 keypoints
and the 512x512 output; it only shrinks channel counts, the feature volume's depth and block counts, so that
tests run in seconds on a CPU.
"""
from __future__ import annotations

import copy

NUM_KP = 21
NUM_BINS = 66

FULL = {
    "appearance_feature_extractor_params": {
        "image_channel": 3, "block_expansion": 64, "num_down_blocks": 2, "max_features": 512,
        "reshape_channel": 32, "reshape_depth": 16, "num_resblocks": 6,
    },
    "motion_extractor_params": {
        "num_kp": NUM_KP, "backbone": "convnextv2_tiny", "depths": [3, 3, 9, 3], "dims": [96, 192, 384, 768],
    },
    "warping_module_params": {
        "num_kp": NUM_KP, "block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
        "reshape_channel": 32, "estimate_occlusion_map": True,
        "dense_motion_params": {
            "block_expansion": 32, "max_features": 1024, "num_blocks": 5, "reshape_depth": 16, "compress": 4,
        },
    },
    "spade_generator_params": {
        "upscale": 2, "block_expansion": 64, "max_features": 512, "num_down_blocks": 2, "out_channels": 64,
        "spade_hidden": 128,
    },
    "stitching_retargeting_module_params": {
        "stitching": {"input_size": 126, "hidden_sizes": [128, 128, 64], "output_size": 65},
        "lip": {"input_size": 65, "hidden_sizes": [128, 128, 64], "output_size": 63},
        "eye": {"input_size": 66, "hidden_sizes": [256, 256, 128, 128, 64], "output_size": 63},
    },
}

TINY = {
    "appearance_feature_extractor_params": {
        "image_channel": 3, "block_expansion": 8, "num_down_blocks": 2, "max_features": 16,
        "reshape_channel": 4, "reshape_depth": 4, "num_resblocks": 1,
    },
    "motion_extractor_params": {
        "num_kp": NUM_KP, "backbone": "convnextv2_tiny", "depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64],
    },
    "warping_module_params": {
        "num_kp": NUM_KP, "block_expansion": 8, "max_features": 16, "num_down_blocks": 2,
        "reshape_channel": 4, "estimate_occlusion_map": True,
        "dense_motion_params": {
            "block_expansion": 4, "max_features": 32, "num_blocks": 5, "reshape_depth": 4, "compress": 1,
        },
    },
    "spade_generator_params": {
        "upscale": 2, "block_expansion": 8, "max_features": 64, "num_down_blocks": 2, "out_channels": 8,
        "spade_hidden": 8,
    },
    "stitching_retargeting_module_params": {
        "stitching": {"input_size": 126, "hidden_sizes": [16, 16], "output_size": 65},
        "lip": {"input_size": 65, "hidden_sizes": [16, 16], "output_size": 63},
        "eye": {"input_size": 66, "hidden_sizes": [16, 16], "output_size": 63},
    },
}

CONFIGS = {"full": FULL, "tiny": TINY}


def model_params(name: str) -> dict:
    """A deep copy of the named configuration ('full' or 'tiny')."""
    if name not in CONFIGS:
        raise ValueError(f"unknown network configuration {name!r}; choose one of {sorted(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])


def feature_volume_shape(params: dict) -> tuple[int, int, int, int]:
    """(C, D, H, W) of F's output volume."""
    f = params["appearance_feature_extractor_params"]
    return (f["reshape_channel"], f["reshape_depth"], 64, 64)


def warped_feature_channels(params: dict) -> int:
    """Channels of W's output (and G's input)."""
    w = params["warping_module_params"]
    return w["block_expansion"] * 2 ** w["num_down_blocks"]
