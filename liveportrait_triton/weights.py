"""Build the sub-networks, load checkpoints in the official on-disk layout, and write synthetic checkpoints.

Official layout (relative to the weights directory)::

    base_models/appearance_feature_extractor.pth   plain state_dict
    base_models/motion_extractor.pth               plain state_dict
    base_models/warping_module.pth                 plain state_dict
    base_models/spade_generator.pth                plain state_dict (spectral norm as weight_orig/u/v)
    retargeting_models/stitching_retargeting_module.pth
        {"retarget_shoulder": sd, "retarget_mouth": sd, "retarget_eye": sd}, keys with or without "module."

Official Animals layout (its own F, M, W and G; stitching is the humans' file above, eye/lip retargeting unused)::

    base_models_v1.1/{appearance_feature_extractor,motion_extractor,warping_module,spade_generator}.pth  (v1.1)
    base_models/...                                                                                      (v1.0)

Loading is strict and uses ``torch.load(weights_only=True)``: no code in a checkpoint runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import model_params
from .networks import (AppearanceFeatureExtractor, MotionExtractor, SPADEDecoder, StitchingRetargetingNetwork,
                       WarpingNetwork)
from .networks.blocks import GRN, ChannelsFirstLayerNorm, SpectralNormConv2d

BASE_FILES = {
    "appearance_feature_extractor": "base_models/appearance_feature_extractor.pth",
    "motion_extractor": "base_models/motion_extractor.pth",
    "warping_module": "base_models/warping_module.pth",
    "spade_generator": "base_models/spade_generator.pth",
}
STITCHING_FILE = "retargeting_models/stitching_retargeting_module.pth"
# folders of the animal base models, in order of preference: v1.1 (the official default since 2025-01-01), v1.0
ANIMAL_BASE_FOLDERS = ("base_models_v1.1", "base_models")
HUMAN_SUBJECTS = ("human", "humans")          # `weights --subject` spellings
ANIMAL_SUBJECTS = ("animal", "animals")
# checkpoint sub-dict -> configuration key of the MLP it holds
STITCHING_SUBDICTS = {"retarget_shoulder": "stitching", "retarget_mouth": "lip", "retarget_eye": "eye"}
DDP_PREFIX = "module."


class WeightsError(ValueError):
    """A checkpoint directory or file that does not match the official layout."""


@dataclasses.dataclass
class Networks:
    """The loaded sub-networks, in eval mode, on CPU."""
    appearance_feature_extractor: AppearanceFeatureExtractor
    motion_extractor: MotionExtractor
    warping_module: WarpingNetwork
    spade_generator: SPADEDecoder
    stitching: StitchingRetargetingNetwork
    eye: StitchingRetargetingNetwork
    lip: StitchingRetargetingNetwork
    params: dict

    def set_grid_sample_mode(self, mode: str) -> None:
        self.warping_module.grid_sample_mode = mode


def build_network(params: dict, name: str) -> nn.Module:
    """One uninitialised module (a key of BASE_FILES or a value of STITCHING_SUBDICTS)."""
    s = params["stitching_retargeting_module_params"]
    builders = {
        "appearance_feature_extractor": lambda: AppearanceFeatureExtractor(**params["appearance_feature_extractor_params"]),
        "motion_extractor": lambda: MotionExtractor(**params["motion_extractor_params"]),
        "warping_module": lambda: WarpingNetwork(**params["warping_module_params"]),
        "spade_generator": lambda: SPADEDecoder(**params["spade_generator_params"]),
        "stitching": lambda: StitchingRetargetingNetwork(**s["stitching"]),
        "lip": lambda: StitchingRetargetingNetwork(**s["lip"]),
        "eye": lambda: StitchingRetargetingNetwork(**s["eye"]),
    }
    if name not in builders:
        raise WeightsError(f"no network named {name!r}; networks: {sorted(builders)}")
    return builders[name]()


def build_networks(params: dict) -> dict[str, nn.Module]:
    """Uninitialised modules for every checkpoint entry, keyed like BASE_FILES and STITCHING_SUBDICTS' values."""
    return {name: build_network(params, name) for name in (*BASE_FILES, *STITCHING_SUBDICTS.values())}


def _ready(module: nn.Module, name: str) -> nn.Module:
    """Eval mode, no gradients, G's spectral norm folded: a loaded module as every runner expects it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if name == "spade_generator":
        module.fold_spectral_norm()
    return module


def _finish(modules: dict[str, nn.Module], params: dict) -> Networks:
    return Networks(params=params, **{name: _ready(m, name) for name, m in modules.items()})


# One sub-network's weights as the torch runtime kinds serve them (`<model>/1/model.pt`, written by export)
NETWORK_FILE_FORMAT = "liveportrait-triton network v1"


def save_network_file(networks: Networks, name: str, path: str | os.PathLike) -> None:
    """Write network `name` of `networks` (its state_dict in the official key layout, with the configuration)."""
    torch.save({"format": NETWORK_FILE_FORMAT, "network": name, "params": networks.params,
                "state_dict": getattr(networks, name).state_dict()}, Path(path))


def load_network_file(path: str | os.PathLike) -> "Networks":
    """The network a save_network_file file holds, as a Networks whose other fields are None (strict load)."""
    document = _torch_load(Path(path))
    if not isinstance(document, dict) or document.get("format") != NETWORK_FILE_FORMAT:
        raise WeightsError(f"{path}: not a network file of this project (expected format {NETWORK_FILE_FORMAT!r}; "
                           "re-run `liveportrait-triton export`)")
    name, params = document["network"], document["params"]
    module = build_network(params, name)
    _load_strict(module, document["state_dict"], str(path), "exported")
    fields = {f.name: None for f in dataclasses.fields(Networks) if f.name != "params"}
    return Networks(params=params, **{**fields, name: _ready(module, name)})


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a checkpoint
        raise WeightsError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _load_strict(module: nn.Module, state: dict, where: str, config: str) -> None:
    if not isinstance(state, dict):
        raise WeightsError(f"{where}: expected a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    for k in expected:
        if k in state:
            if not isinstance(state[k], torch.Tensor):
                problems.append(f"key {k!r} is a {type(state[k]).__name__}, not a tensor")
            elif tuple(state[k].shape) != tuple(expected[k].shape):
                problems.append(f"key {k!r} has shape {list(state[k].shape)} in the file, "
                                f"the network expects {list(expected[k].shape)}")
    problems += [f"missing key {k!r} (expected shape {list(expected[k].shape)})" for k in missing]
    problems += [f"unexpected key {k!r} (shape {list(getattr(state[k], 'shape', []))})" for k in unexpected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise WeightsError(f"{where}: {shown} (do the weights match the {config!r} network configuration?)")
    module.load_state_dict(state, strict=True)


def animal_base_models(animal_dir: str | os.PathLike) -> Path:
    """The folder of an official Animals weights directory that holds its base models: base_models_v1.1/ (v1.1),
    else base_models/ (v1.0); WeightsError naming both when neither holds the four files."""
    root = Path(animal_dir)
    if not root.is_dir():
        raise WeightsError(f"animal weights directory {str(root)!r} does not exist or is not a directory")
    names = [Path(rel).name for rel in BASE_FILES.values()]
    for folder in ANIMAL_BASE_FOLDERS:
        if all((root / folder / name).is_file() for name in names):
            return root / folder
    raise WeightsError(f"animal weights directory {str(root)!r} holds neither "
                       + " nor ".join(f"{folder}/{{{','.join(names)}}}" for folder in ANIMAL_BASE_FOLDERS)
                       + " (the official liveportrait_animals layout)")


def load_networks(weights_dir: str | os.PathLike, config: str = "full",
                  animal_dir: str | os.PathLike | None = None) -> Networks:
    """Load every sub-network from a directory in the official layout (strict; errors name file, key, shapes).

    With `animal_dir` (the official Animals layout), F, M, W and G are the animal set's, loaded as strictly, and
    the stitching (and unused eye/lip) MLPs the humans' from `weights_dir`, as the official Animals mode does."""
    root = Path(weights_dir)
    if not root.is_dir():
        raise WeightsError(f"weights directory {str(root)!r} does not exist or is not a directory")
    base = {name: root / rel for name, rel in BASE_FILES.items()}
    if animal_dir is not None:
        folder = animal_base_models(animal_dir)
        base = {name: folder / Path(rel).name for name, rel in BASE_FILES.items()}
    needed = ([rel for rel in BASE_FILES.values()] if animal_dir is None else []) + [STITCHING_FILE]
    missing = [rel for rel in needed if not (root / rel).is_file()]
    if missing:
        raise WeightsError(f"weights directory {str(root)!r} lacks {', '.join(missing)} "
                           f"(expected the official layout: base_models/*.pth and {STITCHING_FILE})")
    params = model_params(config)
    modules = build_networks(params)
    for name, path in base.items():
        _load_strict(modules[name], _torch_load(path), str(path), config)
    checkpoint = _torch_load(root / STITCHING_FILE)
    where = str(root / STITCHING_FILE)
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{where}: expected a dict with {sorted(STITCHING_SUBDICTS)}, got {type(checkpoint).__name__}")
    for sub, name in STITCHING_SUBDICTS.items():
        if sub not in checkpoint:
            raise WeightsError(f"{where}: missing sub-dict {sub!r} (found {sorted(checkpoint)})")
        state = checkpoint[sub]
        if not isinstance(state, dict):
            raise WeightsError(f"{where}[{sub!r}]: expected a state_dict, got {type(state).__name__}")
        # The official loader removes every occurrence of the DDP prefix.
        state = OrderedDict((k.replace(DDP_PREFIX, ""), v) for k, v in state.items())
        _load_strict(modules[name], state, f"{where}[{sub!r}]", config)
    return _finish(modules, params)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints (deterministic; for `full`, tensor-for-tensor equal to shared/reference/make_test_weights.py)

CONV_GAIN = math.sqrt(3.0)       # keeps activations O(1) through the untrained stacks
HEAD_GAIN = 0.5                  # motion-extractor output heads: keeps keypoints inside W's [-1, 1]^3 grid
GRN_BOUND = 0.5
POWER_ITERATIONS = 30
NORM_RANGES = {"norm_weight": (0.5, 1.5), "norm_bias": (-0.2, 0.2),
               "bn_running_mean": (-0.2, 0.2), "bn_running_var": (0.5, 2.0)}


def _roles(module: nn.Module) -> dict[str, tuple[str, str]]:
    """key -> (role, key of the layer weight that gives the bias fan-in)."""
    roles = {}
    for prefix, sub in module.named_modules():
        p = prefix + "." if prefix else ""
        if isinstance(sub, SpectralNormConv2d):
            roles[p + "weight_orig"] = ("conv_weight", p + "weight_orig")
            roles[p + "weight_u"] = ("spectral_u", p + "weight_orig")
            roles[p + "weight_v"] = ("spectral_v", p + "weight_orig")
            if sub.bias is not None:
                roles[p + "bias"] = ("bias", p + "weight_orig")
        elif isinstance(sub, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            roles[p + "weight"] = ("conv_weight", p + "weight")
            if sub.bias is not None:
                roles[p + "bias"] = ("bias", p + "weight")
        elif isinstance(sub, (nn.BatchNorm2d, nn.BatchNorm3d)):
            roles.update({p + "weight": ("norm_weight", ""), p + "bias": ("norm_bias", ""),
                          p + "running_mean": ("bn_running_mean", ""), p + "running_var": ("bn_running_var", ""),
                          p + "num_batches_tracked": ("bn_num_batches_tracked", "")})
        elif isinstance(sub, (nn.LayerNorm, ChannelsFirstLayerNorm)):
            roles.update({p + "weight": ("norm_weight", ""), p + "bias": ("norm_bias", "")})
        elif isinstance(sub, GRN):
            roles.update({p + "gamma": ("grn", ""), p + "beta": ("grn", "")})
    return roles


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF])


def _uniform(seed: int, name: str, shape, lo: float, hi: float) -> np.ndarray:
    return _rng(seed, name).uniform(lo, hi, size=tuple(shape)).astype(np.float32)


def _fan_in(shape) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.dot(x, x))), 1e-12)


def synthetic_state_dict(module: nn.Module, seed: int, rng_prefix: str, head_prefix: str | None = None) -> OrderedDict:
    """Deterministic values for every entry of module.state_dict(); rng_prefix + key names each tensor's generator."""
    roles = _roles(module)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    values: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key not in roles:
            raise KeyError(f"no initialisation rule for {key!r}")
        role, weight_key = roles[key]
        name = rng_prefix + key
        if role == "conv_weight":
            gain = HEAD_GAIN if head_prefix and key.startswith(head_prefix) else CONV_GAIN
            bound = gain / math.sqrt(_fan_in(shape))
            values[key] = _uniform(seed, name, shape, -bound, bound)
        elif role == "bias":
            bound = 1.0 / math.sqrt(_fan_in(shapes[weight_key]))
            values[key] = _uniform(seed, name, shape, -bound, bound)
        elif role in NORM_RANGES:
            values[key] = _uniform(seed, name, shape, *NORM_RANGES[role])
        elif role == "bn_num_batches_tracked":
            values[key] = np.zeros(shape, np.int64)
        elif role == "grn":
            values[key] = _uniform(seed, name, shape, -GRN_BOUND, GRN_BOUND)
    for key, (role, weight_key) in roles.items():
        if role != "spectral_u":
            continue
        w = values[weight_key].astype(np.float64).reshape(shapes[weight_key][0], -1)
        u = _unit(_rng(seed, rng_prefix + key).standard_normal(w.shape[0]))
        for _ in range(POWER_ITERATIONS):
            v = _unit(w.T @ u)
            u = _unit(w @ v)
        values[key] = u.astype(np.float32)
        values[key[: -len("weight_u")] + "weight_v"] = v.astype(np.float32)
    return OrderedDict((k, torch.from_numpy(np.array(values[k], order="C", copy=True))) for k in shapes)


def synthetic_checkpoints(seed: int, config: str = "full") -> dict[str, dict]:
    """relative path -> checkpoint object, in the official layout."""
    modules = build_networks(model_params(config))
    out: dict[str, dict] = {}
    for name, rel in BASE_FILES.items():
        head = "detector.fc_" if name == "motion_extractor" else None
        out[rel] = synthetic_state_dict(modules[name], seed, rel, head)
    stitching = OrderedDict()
    for sub, name in STITCHING_SUBDICTS.items():
        sd = synthetic_state_dict(modules[name], seed, f"{STITCHING_FILE}{sub}/{DDP_PREFIX}")
        stitching[sub] = OrderedDict((DDP_PREFIX + k, v) for k, v in sd.items())
    out[STITCHING_FILE] = stitching
    return out


def synthetic_animal_checkpoints(seed: int, config: str = "full") -> dict[str, dict]:
    """relative path -> checkpoint object in the official Animals layout (base_models_v1.1/): the base models that
    synthetic_checkpoints makes for the seed, so seed 3 (full) is the reference's `make_test_weights.py --seed 3`
    base models, which its Animals vectors place at the animal paths."""
    checkpoints = synthetic_checkpoints(seed, config)
    return {f"{ANIMAL_BASE_FOLDERS[0]}/{Path(rel).name}": checkpoints[rel] for rel in BASE_FILES.values()}


def write_synthetic_weights(out_dir: str | os.PathLike, seed: int, config: str = "full",
                            subject: str = "human") -> list[Path]:
    """Write synthetic checkpoints in the official layout (humans), or the official Animals layout (`subject`
    animal); returns the written paths."""
    if subject not in (*HUMAN_SUBJECTS, *ANIMAL_SUBJECTS):
        raise WeightsError(f"unknown subject {subject!r}; choose one of {[*HUMAN_SUBJECTS, *ANIMAL_SUBJECTS]}")
    make = synthetic_animal_checkpoints if subject in ANIMAL_SUBJECTS else synthetic_checkpoints
    written = []
    for rel, obj in make(seed, config).items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


def tensor_manifest(checkpoints: dict[str, dict]) -> dict[str, str]:
    """sha256 of every tensor's raw bytes, keyed '<file>:<key>' (sub-dicts as '<file>:<sub>/<key>')."""
    manifest = {}
    for rel, obj in checkpoints.items():
        stack = [("", obj)]
        while stack:
            prefix, d = stack.pop()
            for k, v in d.items():
                if isinstance(v, dict):
                    stack.append((prefix + k + "/", v))
                else:
                    manifest[f"{rel}:{prefix}{k}"] = hashlib.sha256(v.numpy().tobytes()).hexdigest()
    return manifest
