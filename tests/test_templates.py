"""Motion templates: the official .pkl files read safely, the project's .npz format, and refusal of unsafe pickles."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import ASSETS, SHARED_ASSETS, need_shared
from liveportrait_triton.client.templates import (MotionTemplate, TemplateError, load_template, safe_unpickle,
                                                  save_npz)

# frames and fps of each official template (its n_frames / output_fps; the loader checks n_frames == len(motion))
TEMPLATES = {"wink": (57, 25.0), "talking": (100, 20.0), "shake_face": (93, 20.0), "open_lip": (77, 25.0)}


@pytest.mark.parametrize("name", TEMPLATES)
def test_official_templates_load(name):
    template = load_template(need_shared(SHARED_ASSETS / "templates" / f"{name}.pkl"))
    assert (len(template), template.fps) == TEMPLATES[name]
    assert template.R.shape == (len(template), 3, 3) and template.exp.shape == (len(template), 21, 3)
    assert template.t.shape == (len(template), 3) and template.scale.shape == (len(template), 1)
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), template.R.shape)
    assert np.allclose(template.R @ np.transpose(template.R, (0, 2, 1)), eye, atol=1e-5)
    assert np.all(template.scale > 0)


@pytest.mark.parametrize("name", ["wink", "talking"])
def test_pkl_and_npz_hold_the_same_motion(tmp_path, name):
    """The generated templates in the official pickle layout (tests/generated_media.py) survive conversion."""
    template = load_template(ASSETS / "templates" / f"{name}.pkl")
    path = save_npz(template, tmp_path / f"{name}.npz")
    again = load_template(path)
    assert again.fps == template.fps
    for key in ("R", "exp", "t", "scale"):
        assert np.array_equal(getattr(again, key), getattr(template, key))
    assert np.array_equal(again.eye_ratio, template.eye_ratio) and again.eye_ratio.shape == (len(template), 2)
    assert np.array_equal(again.lip_ratio, template.lip_ratio) and again.lip_ratio.shape == (len(template), 1)
    # the .npz holds plain arrays only: numpy opens it with pickle disabled
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    assert list(tmp_path.iterdir()) == [path]              # no temporary file left beside it


def test_npz_round_trip_with_ratios(tmp_path):
    rng = np.random.default_rng(0)
    n = 5
    template = MotionTemplate(30.0, np.broadcast_to(np.eye(3), (n, 3, 3)), rng.normal(size=(n, 21, 3)),
                              rng.normal(size=(n, 3)), np.ones((n, 1)), eye_ratio=rng.uniform(size=(n, 2)),
                              lip_ratio=rng.uniform(size=(n, 1)))
    again = load_template(save_npz(template, tmp_path / "t.npz"))
    assert np.array_equal(again.eye_ratio, template.eye_ratio) and np.array_equal(again.lip_ratio, template.lip_ratio)
    assert again.ratios(2) == (float(template.eye_ratio[2, 0]), float(template.lip_ratio[2, 0]))
    assert again.frame(1).exp.shape == (21, 3)


class RunsCode:
    """An object whose unpickling would run a shell command (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"n_frames": 1, "output_fps": 25, "motion": [RunsCode(marker)]}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    # the payload really runs code when loaded with plain pickle (in a child process, to prove the point)
    assert subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"]).returncode == 0
    assert marker.exists()
    marker.unlink()
    with pytest.raises(TemplateError, match=r"refusing to load (posix|os)\.system"):
        load_template(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval),                                        # builtins.eval
    pickle.dumps(subprocess.Popen),                            # any importable class
    pickle.dumps(np.array([1, {"a": 1}], dtype=object)),       # object arrays carry arbitrary objects
])
def test_other_globals_and_object_arrays_are_refused(payload):
    with pytest.raises(TemplateError, match="refusing"):
        safe_unpickle(payload)


def test_plain_arrays_and_scalars_are_accepted():
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.float64(1.5), (1, "x")], "c": None}
    for protocol in (2, 4, 5):
        out = safe_unpickle(pickle.dumps(value, protocol=protocol))
        assert np.array_equal(out["a"], value["a"]) and out["b"][0] == 1.5 and out["b"][1] == (1, "x")


def test_broken_and_wrong_files(tmp_path):
    good = (ASSETS / "templates" / "wink.pkl").read_bytes()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(TemplateError, match="not a readable pickle"):
        load_template(truncated)
    not_a_template = tmp_path / "list.pkl"
    not_a_template.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(TemplateError, match="expected a dict with a 'motion' list"):
        load_template(not_a_template)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_template(tmp_path / "absent.pkl")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(TemplateError, match="format tag"):
        load_template(other)
    objects = tmp_path / "objects.npz"
    np.savez(objects, format=np.array("liveportrait-triton-template/1"), R=np.array([None], dtype=object))
    with pytest.raises(TemplateError, match="plain-array"):
        load_template(objects)
    bad_shape = dict(fps=25.0, R=np.zeros((3, 3, 3)), exp=np.zeros((2, 21, 3)), t=np.zeros((3, 3)),
                     scale=np.ones((3, 1)))
    with pytest.raises(TemplateError, match="'exp'"):
        MotionTemplate(**bad_shape)


def test_template_command_converts_pkl_to_npz(tmp_path):
    from liveportrait_triton.cli import main
    out = tmp_path / "wink.npz"
    assert main(["template", "--driving", str(ASSETS / "templates" / "wink.pkl"), "--output", str(out),
                 "--quiet"]) == 0
    a, b = load_template(ASSETS / "templates" / "wink.pkl"), load_template(out)
    assert np.array_equal(a.exp, b.exp) and np.array_equal(a.R, b.R) and len(b) == len(a)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"motion": [RunsCode(tmp_path / "pwned")]}))
    assert main(["template", "--driving", str(evil), "--output", str(tmp_path / "evil.npz"), "--quiet"]) == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "evil.npz").exists()
