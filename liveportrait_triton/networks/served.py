"""Served sub-networks as nn.Modules whose positional inputs and tuple outputs follow the tensor spec.

Exporters bind graph inputs and outputs by position, so each served model gets a wrapper whose `forward` takes the
spec's inputs in the spec's order and returns the spec's outputs in the spec's order. The runtime layer's torch
kinds run the same modules (`named_outputs`), so an exported graph computes exactly what the in-process pipeline
computes. Nothing here imports the exporter or the server: they both look down at this module.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import spec

# served model -> the Networks field that holds its network
NETWORK_FIELD = {
    spec.APPEARANCE: "appearance_feature_extractor",
    spec.MOTION: "motion_extractor",
    spec.WARPING: "warping_module",
    spec.GENERATOR: "spade_generator",
    spec.STITCHING: "stitching",
    spec.RETARGET_EYE: "eye",
    spec.RETARGET_LIP: "lip",
}


def mlp_forward(networks, model: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The S MLPs take the flattened keypoints concatenated with the second input."""
    kp = t["kp_source"].reshape(t["kp_source"].shape[0], -1)
    if model == spec.STITCHING:
        return networks.stitching(torch.cat([kp, t["kp_driving"].reshape(kp.shape[0], -1)], 1))
    if model == spec.RETARGET_EYE:
        return networks.eye(torch.cat([kp, t["eye_ratio"]], 1))
    return networks.lip(torch.cat([kp, t["lip_ratio"]], 1))


def parse_output(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, H, W, 3) uint8 as the official parse_output: clip to [0, 1], x255, truncate.

    The truncation is an explicit floor before the cast, so every runtime truncates (OpenVINO's float-to-integer
    Convert would otherwise round).
    """
    return torch.floor(torch.clamp(image, 0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ServedModel(nn.Module):
    """forward(*inputs in spec order) -> tuple of outputs in spec order, for one served model."""

    def __init__(self, networks, model_spec: spec.ModelSpec):
        super().__init__()
        role = spec.role_of(model_spec.name)
        if role not in NETWORK_FIELD:
            raise KeyError(f"no network serves model {model_spec.name!r}; served models: {list(spec.ALL_SUBMODELS)}")
        self.model_spec = model_spec
        self.role = role            # the sub-network it runs (an animal model runs its role's architecture)
        self.field = NETWORK_FIELD[role]
        # Registered under the Networks field name, so mlp_forward can take this module as `networks`.
        self.add_module(self.field, getattr(networks, self.field))

    def named_outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = self.role
        net = getattr(self, self.field)
        if name == spec.APPEARANCE:
            return {"feature_volume": net(inputs["image"])}
        if name == spec.MOTION:
            return net(inputs["image"])
        if name == spec.WARPING:
            out = net(inputs["feature_volume"], inputs["kp_source"], inputs["kp_driving"])
            return {"warped_feature": out["out"], "occlusion_map": out["occlusion_map"]}
        if name == spec.GENERATOR:
            return {"image": parse_output(net(inputs["warped_feature"]))}
        return {"delta": mlp_forward(self, name, inputs)}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.model_spec.inputs):
            raise TypeError(f"{self.model_spec.name} takes {self.model_spec.input_names}, got {len(inputs)} tensors")
        out = self.named_outputs(dict(zip(self.model_spec.input_names, inputs)))
        return tuple(out[n] for n in self.model_spec.output_names)


def served_models(networks) -> dict[str, ServedModel]:
    """A ServedModel for every served sub-network, in spec.SUBMODELS order."""
    specs = spec.submodel_specs(networks.params)
    return {name: ServedModel(networks, specs[name]) for name in spec.SUBMODELS}
