"""LivePortrait served by NVIDIA Triton: networks, keypoint maths, tensor specs and the shared pipeline logic."""
__version__ = "0.1.0"
