"""Shared fixtures: paths to ../shared, synthetic weights, loaded networks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LP_SHARED_DIR", REPO.parent / "shared"))
ASSETS = SHARED / "assets"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def reference():
    path = REFERENCE / "public" / "ref_seed0_s0_d30.npz"
    if not path.is_file():
        pytest.fail(f"parity vectors not found at {path} (set LP_SHARED_DIR to the shared/ folder)")
    return dict(np.load(path))


@pytest.fixture(scope="session")
def full_weights_dir(tmp_path_factory):
    from liveportrait_triton.weights import write_synthetic_weights
    out = tmp_path_factory.mktemp("weights_full_seed0")
    write_synthetic_weights(out, seed=0, config="full")
    return out


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    from liveportrait_triton.weights import write_synthetic_weights
    out = tmp_path_factory.mktemp("weights_tiny_seed0")
    write_synthetic_weights(out, seed=0, config="tiny")
    return out


@pytest.fixture(scope="session")
def full_networks(full_weights_dir):
    from liveportrait_triton.weights import load_networks
    return load_networks(full_weights_dir, "full")


@pytest.fixture(scope="session")
def tiny_networks(tiny_weights_dir):
    from liveportrait_triton.weights import load_networks
    return load_networks(tiny_weights_dir, "tiny")
