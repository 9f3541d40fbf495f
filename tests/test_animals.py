"""The official Animals mode beside the human set: weights, options, keypoint maths and images against the official
outputs (tests/data/parity_animals_seed3_s39_wink.npz, compact copy of shared/reference/public/
ref_animals_seed3_s39_wink.npz), and one server holding both sets.

The official run (shared/reference/README.md, "Animals mode"): synthetic animal weights seed 3 (F, M, W, G) with the
human seed-0 stitching MLP, the cat s39 resized whole to 256x256, the wink template's frames 0, 4, 8 (frame 0 first),
driving multiplier 1.75, with and without stitching. The template's own scale is not stored (the Animals mode never
reads it) and its tz is 0; the frames sent here carry a driving scale far from the source's and a tz that changes
from frame to frame, so that using the one or keeping the other shows (`test_planted_mistakes_fail`).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import DATA, assert_images_close
from liveportrait_triton import keypoints as K
from liveportrait_triton import spec
from liveportrait_triton.pipeline import Animator, StreamState, TorchRunner
from liveportrait_triton.wire import DrivingFrame, MotionFrame

TOL_KP = 1e-5                # kp_driving_final, x_s: the human keypoints' bound (tests/test_parity.py)
TOL_MULTIPLIER = 1e-6        # relative: the official float32 value vs our float64 hull volumes
UINT8_LEVELS = 1             # G's image at the compact file's samples: within one level ...
UINT8_SHARE = 0.01           # ... and at most 1% of them different at all
DRIVING_MULTIPLIER = 1.75
DRIVING_SCALE = 2.0          # sent with every template frame; the Animals mode must not use it
TZ_STEP = 0.05               # tz of the k-th frame sent: k * TZ_STEP; the Animals mode must zero it


def template_frames(reference) -> list[DrivingFrame]:
    """The reference's template frames as sent to the pipeline (with DRIVING_SCALE and a changing tz)."""
    frames = []
    for k, index in enumerate(reference["frames"]):
        t = reference[f"f{index}_template_t"].reshape(3).copy()
        t[2] = k * TZ_STEP
        frames.append(DrivingFrame(motion=MotionFrame(R=reference[f"f{index}_template_R"].reshape(3, 3),
                                                      exp=reference[f"f{index}_template_exp"].reshape(21, 3),
                                                      t=t, scale=np.float32([DRIVING_SCALE]))))
    return frames


def animal_options(stitching: bool) -> dict:
    return spec.parse_options({"subject": "animal", "driving_multiplier": DRIVING_MULTIPLIER,
                               "stitching": stitching})


def reference_state(reference, stitching: bool) -> StreamState:
    """A stream state made of the official source arrays (as register_sources would make it from F and M)."""
    source = K.MotionInfo(R=K.rotation_matrix(reference["M_source_info_pitch"], reference["M_source_info_yaw"],
                                              reference["M_source_info_roll"]),
                          t=reference["M_source_info_t"], exp=reference["M_source_info_exp"],
                          scale=reference["M_source_info_scale"], kp=reference["M_source_info_kp"])
    return StreamState(options=animal_options(stitching), feature_volume=np.zeros(1, np.float32), source=source,
                       x_s=reference["x_s"])


def keypoint_failures(reference, stitching: bool, kp_driving: list[np.ndarray], multiplier: float) -> list[str]:
    """How the keypoints of the sent frames and the motion multiplier differ from the official ones."""
    setting = "stitch" if stitching else "nostitch"
    failures = []
    for index, x_d in zip(reference["frames"], kp_driving):
        deviation = float(np.abs(x_d - reference[f"f{index}_{setting}_kp_driving_final"]).max())
        if not deviation <= TOL_KP:
            failures.append(f"frame {index} {setting}: kp_driving_final off by {deviation:.3g}")
    official = float(reference["motion_multiplier"][0])
    if not abs(multiplier / official - 1) <= TOL_MULTIPLIER:
        failures.append(f"motion multiplier {multiplier!r}, official {official!r}")
    return failures


def image_failures(reference, stitching: bool, images: list[np.ndarray]) -> list[str]:
    """How the images differ from the official G_out_uint8 at the compact file's samples."""
    setting = "stitch" if stitching else "nostitch"
    failures = []
    for index, image in zip(reference["frames"], images):
        name = f"f{index}_{setting}_G_out_uint8"
        sampled = image[None].reshape(-1)[reference.data[f"{name}.index"]].astype(int)
        diff = np.abs(sampled - reference.data[f"{name}.value"].astype(int))
        share = float(np.count_nonzero(diff)) / diff.size
        if diff.max() > UINT8_LEVELS or share > UINT8_SHARE:
            failures.append(f"{name}: max {diff.max()} levels, {share:.2%} of samples differ")
    return failures


def run_keypoints(animator: Animator, reference, stitching: bool) -> tuple[list[np.ndarray], float]:
    state = reference_state(reference, stitching)
    kp = [animator.driving_keypoints(state, frame.motion.info(), frame) for frame in template_frames(reference)]
    return kp, state.motion_multiplier


# -- weights ---------------------------------------------------------------------------------------------------

def test_full_synthetic_animal_weights_equal_reference_generator():
    """Seed 3 at the animal paths is, tensor for tensor, `make_test_weights.py --seed 3`'s base models (their
    sha256, copied in tests/data/weights_seed3_base_sha256.json), as the official Animals vectors used them."""
    from liveportrait_triton.weights import synthetic_animal_checkpoints, tensor_manifest
    expected = json.loads((DATA / "weights_seed3_base_sha256.json").read_text())
    actual = {key.replace("base_models_v1.1/", "base_models/", 1): value
              for key, value in tensor_manifest(synthetic_animal_checkpoints(3, "full")).items()}
    assert set(actual) == set(expected)
    differing = [k for k in expected if actual[k] != expected[k]]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_cli_writes_the_animal_layout_and_both_versions_load(tmp_path, tiny_weights_dir):
    from liveportrait_triton.weights import load_networks
    out = tmp_path / "animals"
    proc = subprocess.run([sys.executable, "-m", "liveportrait_triton", "weights", "--synthetic", "3", "--subject",
                           "animals", "--out", str(out), "--config", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "base_models_v1.1").iterdir()) == [
        "appearance_feature_extractor.pth", "motion_extractor.pth", "spade_generator.pth", "warping_module.pth"]
    assert not (out / "retargeting_models").exists()        # stitching is the humans'
    v11 = load_networks(tiny_weights_dir, "tiny", out)
    (out / "base_models_v1.1").rename(out / "base_models")   # the v1.0 layout
    v10 = load_networks(tiny_weights_dir, "tiny", out)
    human = load_networks(tiny_weights_dir, "tiny")
    for a, b in zip(v11.warping_module.state_dict().values(), v10.warping_module.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    first = next(iter(human.warping_module.state_dict()))
    assert not np.array_equal(v11.warping_module.state_dict()[first], human.warping_module.state_dict()[first])
    for a, b in zip(v11.stitching.state_dict().values(), human.stitching.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())         # the humans' stitching MLP


def test_animal_weights_load_strictly(tmp_path, tiny_weights_dir, tiny_animal_weights_dir):
    import torch
    from liveportrait_triton.weights import WeightsError, load_networks
    with pytest.raises(WeightsError, match="neither base_models_v1.1/.* nor base_models/"):
        load_networks(tiny_weights_dir, "tiny", tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_animal_weights_dir, broken)
    path = broken / "base_models_v1.1" / "motion_extractor.pth"
    state = torch.load(path, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"base_models_v1\.1/motion_extractor\.pth: missing key"):
        load_networks(tiny_weights_dir, "tiny", broken)
    with pytest.raises(WeightsError, match="'full'"):      # tiny animal files into full networks: shapes named
        load_networks(tiny_weights_dir, "full", tiny_animal_weights_dir)


# -- options ---------------------------------------------------------------------------------------------------

def test_animal_options_defaults_and_refusals():
    assert spec.parse_options({})["subject"] == "human" and spec.parse_options({})["stitching"] is True
    animal = spec.parse_options({"subject": "animal"})
    assert animal["stitching"] is False and animal["driving_multiplier"] == 1.0
    assert spec.parse_options({"subject": "animal", "stitching": True})["stitching"] is True
    assert spec.parse_options({"subject": "animal", "relative_motion": True})["relative_motion"] is True
    refused = {"eye_retargeting": True, "lip_retargeting": True, "source_video": True, "relative_motion": False,
               "animation_region": "lip", "driving_option": "pose-friendly", "driving_type": "image",
               "anchor": "source"}
    assert set(refused) == set(spec.ANIMAL_OPTIONS)
    for name, value in refused.items():
        with pytest.raises(spec.OptionError, match=f"{name}=.*subject='animal'"):
            spec.parse_options({"subject": "animal", name: value})
    with pytest.raises(spec.OptionError, match="'subject'='cat' is not one of"):
        spec.parse_options({"subject": "cat"})


# -- keypoint maths against the official Animals mode ----------------------------------------------------------

def test_animal_keypoints_match_the_official_ones(animal_reference):
    """The pipeline's animal keypoint rule on the official source arrays (no stitching: no network runs)."""
    kp, multiplier = run_keypoints(Animator(runner=None), animal_reference, stitching=False)
    assert keypoint_failures(animal_reference, False, kp, multiplier) == []
    frames = animal_reference["frames"]
    assert list(frames) == [0, 4, 8]


def _tz_kept(source, driving):
    return K.compose_keypoints(source.kp, driving.R, driving.exp, source.scale, driving.t)


def _driving_scale(source, driving):
    t = driving.t.copy()
    t[:, 2] = 0
    return K.compose_keypoints(source.kp, driving.R, driving.exp, driving.scale, t)


MISTAKES = ("tz not zeroed", "driving scale used", "multiplier from the latest frame",
            "multiplier from the relative keypoints")


@pytest.mark.parametrize("mistake", MISTAKES)
def test_planted_mistakes_fail(animal_reference, monkeypatch, mistake):
    """Each mistake, planted in the pipeline's maths, makes the comparison with the official outputs fail."""
    if mistake == "tz not zeroed":
        monkeypatch.setattr(K, "animal_driving_keypoints", _tz_kept)
    elif mistake == "driving scale used":
        monkeypatch.setattr(K, "animal_driving_keypoints", _driving_scale)
    elif mistake == "multiplier from the latest frame":
        relative = K.relative_to_anchor

        def latest(x_d, x_d0, x_s, multiplier):
            return relative(x_d, x_d0, x_s, K.convex_hull_multiplier(x_s, x_d))
        monkeypatch.setattr(K, "relative_to_anchor", latest)
        original = Animator.animal_keypoints

        def remember_latest(self, state, driving, frame):
            out = original(self, state, driving, frame)
            state.motion_multiplier = K.convex_hull_multiplier(state.x_s, K.animal_driving_keypoints(state.source,
                                                                                                     driving))
            return out
        monkeypatch.setattr(Animator, "animal_keypoints", remember_latest)
    else:
        hull = K.convex_hull_multiplier
        monkeypatch.setattr(K, "convex_hull_multiplier", lambda x_s, x_d0: hull(x_s, x_s))
    kp, multiplier = run_keypoints(Animator(runner=None), animal_reference, stitching=False)
    assert keypoint_failures(animal_reference, False, kp, multiplier), f"{mistake} was not caught"


# -- the whole pipeline, in-process, full size ------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_animal_networks(full_weights_dir, tmp_path_factory):
    from liveportrait_triton.weights import load_networks, write_synthetic_weights
    out = tmp_path_factory.mktemp("weights_full_animals_seed3")
    write_synthetic_weights(out, seed=3, config="full", subject="animal")
    return load_networks(full_weights_dir, "full", out)


def animate_recording(animator: Animator, reference, stitching: bool):
    """The Animator on the reference's source crop and frames, one frame per call: (images, kp_driving_final
    as sent to W, the stream state)."""
    sent = []
    render = animator.render

    def recording_render(volumes, x_s, x_d, subject=spec.HUMAN):
        sent.append(np.asarray(x_d))
        return render(volumes, x_s, x_d, subject)
    animator.render = recording_render
    [state] = animator.register_sources([reference["source_rgb256_uint8"]], [animal_options(stitching)])
    images = [animator.animate([state], [frame])[0] for frame in template_frames(reference)]
    return images, sent, state


@pytest.mark.slow
@pytest.mark.parametrize("stitching", [False, True])
def test_full_animal_pipeline_matches_the_official_outputs(full_networks, full_animal_networks, animal_reference,
                                                           stitching):
    """F, M (x_s), the keypoints sent to W, the motion multiplier and G's image of the in-process pipeline (PyTorch,
    both sets loaded, animal F/M/W/G and the human stitching MLP) against the official Animals mode."""
    animator = Animator(TorchRunner({spec.HUMAN: full_networks, spec.ANIMAL: full_animal_networks}))
    images, sent, state = animate_recording(animator, animal_reference, stitching)
    assert float(np.abs(state.x_s - animal_reference["x_s"]).max()) <= TOL_KP
    failures = keypoint_failures(animal_reference, stitching, sent, state.motion_multiplier)
    failures += image_failures(animal_reference, stitching, images)
    assert failures == []
    # the image comparison can fail: the human set's networks on the same keypoints are far off
    human = Animator(TorchRunner(full_networks))
    [human_state] = human.register_sources([animal_reference["source_rgb256_uint8"]], [spec.parse_options({})])
    wrong = human.render(human_state.feature_volume, state.x_s, sent[-1])
    assert image_failures(animal_reference, stitching, [images[0], images[1], wrong])


# -- one server, both sets ---------------------------------------------------------------------------------------

BATCH_WINDOW_US = 2_000_000      # the pipeline waits this long for company: requests sent together batch


@pytest.fixture(scope="module")
def both_server(tiny_both_repository, tmp_path_factory):
    """The tiny human and animal sets in one repository, the pipeline batching within a long window."""
    from liveportrait_triton import repository as repo
    from liveportrait_triton.runtimes import runtime_plan
    from liveportrait_triton.serve import TritonServer
    both = (spec.HUMAN, spec.ANIMAL)
    repository = tmp_path_factory.mktemp("repository_both_batching")
    repo.copy_artefacts(tiny_both_repository, repository)
    repo.write_repository_configs(repository, "local", "tiny", plan=runtime_plan("local", subjects=both),
                                  subjects=both, options=repo.ServingOptions(pipeline_queue_delay_us=BATCH_WINDOW_US))
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("triton_log_both") / "tritonserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def in_process_both(tiny_networks, tiny_animal_networks):
    return TorchRunner({spec.HUMAN: tiny_networks, spec.ANIMAL: tiny_animal_networks})


def in_process_frames(runner, source: np.ndarray, options: dict, frames: list[DrivingFrame]) -> list[np.ndarray]:
    animator = Animator(runner)
    [state] = animator.register_sources([source], [spec.parse_options(options)])
    return [animator.animate([state], [frame])[0] for frame in frames]


def statistics(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def settled_statistics(client, models, before, want: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Per-model (inferences, executions) since `before`, once each model counted what `want` says (Triton records
    a request's statistics after its response went out), or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        now = {m: tuple(a - b for a, b in zip(statistics(client, m), before[m])) for m in models}
        if all(now[m][0] >= want.get(m, 0) for m in models) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


@pytest.mark.server
def test_human_and_animal_streams_on_one_server(both_server, in_process_both, source_crops, driving_crops):
    """Two human and two animal streams at once: every frame back, each the in-process frame of its own set; the
    animal models count exactly the animal streams' work, the human models the human streams', and each set's
    sub-networks ran batches of its own streams (fewer executions than inferences, no inference mixed)."""
    import tritonclient.grpc as grpcclient
    from liveportrait_triton.client import LivePortraitClient, SourceInput
    frames = [DrivingFrame(crop=driving_crops[i]) for i in range(3)]
    streams = {("human", "s0"): {}, ("human", "s1"): {},
               ("animal", "s0"): {"subject": "animal"}, ("animal", "s1"): {"subject": "animal", "stitching": True}}
    client = grpcclient.InferenceServerClient(both_server.grpc_url)
    models = [*spec.SUBMODELS[:5], *spec.ANIMAL_SUBMODELS]
    before = {m: statistics(client, m) for m in models}
    results: dict = {}
    barrier = threading.Barrier(len(streams))

    def run(key):
        with LivePortraitClient(both_server.grpc_url) as lp:
            barrier.wait()
            with lp.stream(SourceInput(source_crops[key[1]], streams[key]), max_in_flight=len(frames)) as stream:
                for i, frame in enumerate(frames):
                    stream.send(frame, last=i == len(frames) - 1)
                results[key] = [(r.number, r.image) for r in stream.finish()]

    threads = [threading.Thread(target=run, args=(key,)) for key in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == sorted(streams)
    for key, got in results.items():
        want = in_process_frames(in_process_both, source_crops[key[1]], streams[key], frames)
        assert [index for index, _ in got] == list(range(len(frames))), key
        for i, ((_, image), expected) in enumerate(zip(got, want)):
            assert_images_close(image, expected, f"{key} frame {i}")
    human_s0 = in_process_frames(in_process_both, source_crops["s0"], {"stitching": False}, frames)
    assert np.abs(human_s0[1].astype(int) - results[("animal", "s0")][1][1]).mean() > 1, "the sets' frames differ"
    # per model: 2 starts (F, M) and 6 frames (M, W, G) of each set; the shared stitching MLP: the frames of the
    # stitched streams (both human ones by default, one animal one that asked)
    per_set = {spec.APPEARANCE: 2, spec.MOTION: 2 + 6, spec.WARPING: 6, spec.GENERATOR: 6}
    want = {**per_set, **{spec.served_name(m, spec.ANIMAL): n for m, n in per_set.items()}, spec.STITCHING: 6 + 3}
    counted = settled_statistics(client, models, before, want)
    assert {m: counted[m][0] for m in want} == want
    for model in (spec.WARPING, spec.GENERATOR, *spec.ANIMAL_SUBMODELS[2:]):
        inferences, executions = counted[model]
        assert executions < inferences, f"{model}: {executions} executions for {inferences} inferences"


@pytest.mark.server
def test_animal_refusals_name_the_problem(both_server, tiny_server, source_crops, driving_crops):
    """Options the animal set lacks and edits are refused by the server itself (the client checks are bypassed
    here); a server without the animal set refuses an animal sequence; each server keeps serving."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    from test_server import tensors

    def start(url, parameters, **arrays):
        with grpcclient.InferenceServerClient(url) as client:
            arrays = {"source": source_crops["s0"], **arrays}
            return client.infer(spec.PIPELINE, tensors(grpcclient, **arrays), sequence_id=int(time.time_ns() % 10**9),
                                sequence_start=True, sequence_end=True, parameters=parameters)

    with pytest.raises(InferenceServerException, match="eye_retargeting=True are not available with subject='animal'"):
        start(both_server.grpc_url, {"subject": "animal", "eye_retargeting": True},
              source_eye_ratio=np.float32([0.3, 0.3]))
    with pytest.raises(InferenceServerException, match="source_video=True are not available"):
        start(both_server.grpc_url, {"subject": "animal", "source_video": True})
    with pytest.raises(InferenceServerException, match="edits apply to human sequences"):
        start(both_server.grpc_url, {"subject": "animal", "edit": True, "yaw": 5.0})
    with pytest.raises(InferenceServerException, match="this server has no animal model set .it serves human."):
        start(tiny_server.grpc_url, {"subject": "animal"}, driving=driving_crops[0])
    for url in (both_server.grpc_url, tiny_server.grpc_url):
        result = start(url, {}, driving=driving_crops[0])
        assert result.as_numpy("image").shape == (1, 512, 512, 3)
    result = start(both_server.grpc_url, {"subject": "animal"}, driving=driving_crops[0])
    assert result.as_numpy("image").shape == (1, 512, 512, 3)
