"""Checkpoint loading in the official layout: strictness, clear errors, synthetic weights."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from liveportrait_triton.weights import (BASE_FILES, STITCHING_FILE, WeightsError, load_networks,
                                         synthetic_checkpoints, tensor_manifest, write_synthetic_weights)

from conftest import DATA


def test_full_synthetic_weights_equal_reference_generator():
    """Every tensor's bytes equal those of shared/reference/make_test_weights.py --seed 0 (their sha256 manifest,
    shared/reference/public/weights_seed0_sha256.json, is copied in tests/data)."""
    expected = json.loads((DATA / "weights_seed0_sha256.json").read_text())
    actual = tensor_manifest(synthetic_checkpoints(0, "full"))
    assert set(actual) == set(expected)
    differing = [k for k in expected if actual[k] != expected[k]]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_cli_writes_loadable_tiny_weights(tmp_path):
    out = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "liveportrait_triton", "weights", "--synthetic", "3",
                           "--out", str(out), "--config", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for rel in [*BASE_FILES.values(), STITCHING_FILE]:
        assert (out / rel).is_file()
    nets = load_networks(out, "tiny")
    assert not nets.spade_generator.training


@pytest.fixture()
def tiny_copy(tiny_weights_dir, tmp_path):
    dst = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, dst)
    return dst


def _rewrite(path, edit):
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_networks(tmp_path / "nope", "tiny")


def test_missing_file_is_named(tiny_copy):
    os.remove(tiny_copy / BASE_FILES["warping_module"])
    with pytest.raises(WeightsError, match="base_models/warping_module.pth"):
        load_networks(tiny_copy, "tiny")


def test_missing_key_names_file_key_and_shape(tiny_copy):
    path = tiny_copy / BASE_FILES["appearance_feature_extractor"]
    _rewrite(path, lambda sd: sd.pop("second.bias"))
    with pytest.raises(WeightsError) as err:
        load_networks(tiny_copy, "tiny")
    msg = str(err.value)
    assert "appearance_feature_extractor.pth" in msg and "'second.bias'" in msg and "missing" in msg
    assert "[16]" in msg


def test_unexpected_key_is_an_error(tiny_copy):
    path = tiny_copy / BASE_FILES["motion_extractor"]
    _rewrite(path, lambda sd: sd.__setitem__("detector.extra.weight", torch.zeros(2, 2)))
    with pytest.raises(WeightsError, match=r"unexpected key 'detector.extra.weight' \(shape \[2, 2\]\)"):
        load_networks(tiny_copy, "tiny")


def test_wrong_shape_names_both_shapes(tiny_copy):
    path = tiny_copy / BASE_FILES["spade_generator"]
    _rewrite(path, lambda sd: sd.__setitem__("fc.bias", torch.zeros(7)))
    with pytest.raises(WeightsError) as err:
        load_networks(tiny_copy, "tiny")
    msg = str(err.value)
    assert "spade_generator.pth" in msg and "'fc.bias'" in msg and "[7]" in msg and "[64]" in msg


def test_full_config_refuses_tiny_weights(tiny_weights_dir):
    with pytest.raises(WeightsError, match="has shape"):
        load_networks(tiny_weights_dir, "full")


def test_stitching_keys_with_and_without_ddp_prefix(tiny_copy):
    path = tiny_copy / STITCHING_FILE
    before = load_networks(tiny_copy, "tiny").eye.mlp[0].weight.clone()

    def strip(ck):
        for sub in list(ck):
            ck[sub] = OrderedDict((k.replace("module.", ""), v) for k, v in ck[sub].items())
    _rewrite(path, strip)
    after = load_networks(tiny_copy, "tiny").eye.mlp[0].weight
    assert torch.equal(before, after)


def test_missing_stitching_subdict_is_named(tiny_copy):
    _rewrite(tiny_copy / STITCHING_FILE, lambda ck: ck.pop("retarget_mouth"))
    with pytest.raises(WeightsError, match="missing sub-dict 'retarget_mouth'"):
        load_networks(tiny_copy, "tiny")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tiny_copy, tmp_path):
    marker = tmp_path / "pwned"
    path = tiny_copy / BASE_FILES["motion_extractor"]
    with open(path, "wb") as f:
        pickle.dump({"detector.norm.weight": _RunsCode(marker)}, f)
    with pytest.raises(WeightsError, match="cannot be read as a PyTorch checkpoint"):
        load_networks(tiny_copy, "tiny")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tiny_copy):
    path = tiny_copy / BASE_FILES["warping_module"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="warping_module.pth: cannot be read"):
        load_networks(tiny_copy, "tiny")


def test_synthetic_weights_are_deterministic(tmp_path):
    a = tensor_manifest(synthetic_checkpoints(5, "tiny"))
    b = tensor_manifest(synthetic_checkpoints(5, "tiny"))
    c = tensor_manifest(synthetic_checkpoints(6, "tiny"))
    assert a == b and a != c
    write_synthetic_weights(tmp_path, 5, "tiny")
    assert not list(tmp_path.rglob("*.tmp"))
