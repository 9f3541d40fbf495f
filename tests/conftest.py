"""Shared fixtures: the compact parity vectors, generated test media, synthetic weights, loaded networks.

Everything the suite needs ships in the repository or is generated: tests/data/ holds the compact official parity
vectors (tests/make_compact_reference.py made them from shared/reference), and the portraits, driving videos,
images and templates the tests use are generated from scikit-image's astronaut (tests/generated_media.py). The
shared/ folder beside the repository (`LP_SHARED_DIR` overrides where) is an optional extra: the full-size
parity vectors, the official example media and motion templates; tests that need it skip when it is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import generated_media

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LP_SHARED_DIR", REPO.parent / "shared"))
SHARED_ASSETS = SHARED / "assets"
REFERENCE = SHARED / "reference"
DATA = REPO / "tests" / "data"
COMPACT_REFERENCE = DATA / "parity_seed0_s0_d30.npz"
COMPACT_ANIMALS = DATA / "parity_animals_seed3_s39_wink.npz"     # the official Animals mode (README there)
ASSETS = generated_media.ensure()       # same layout as shared/assets: source/, driving/, templates/


def need_shared(path: Path) -> Path:
    """`path` inside the optional shared/ folder, or skip the test saying what is missing."""
    if not path.exists():
        pytest.skip(f"needs {path} (the optional shared/ folder; set LP_SHARED_DIR to it)")
    return path


class CompactReference:
    """The official parity vectors as committed in tests/data: small arrays whole, large ones sampled.

    `ref[name]` gives a whole array (the 256x256 input tensors are rebuilt from their uint8 images); a sampled
    tensor's `.index`, `.value`, `.channel_mean` and `.channel_std` are read by `differences`.
    """

    IMAGES = ("source", "driving", "driving0")

    def __init__(self, path: Path, images: tuple[str, ...] = IMAGES):
        self.data = dict(np.load(path))
        self.sampled = {k.rsplit(".", 1)[0] for k in self.data if k.endswith(".index")}
        for image in images:
            rgb = self.data[f"{image}_rgb256_uint8"]
            self.data[f"{image}_tensor"] = (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.sampled:
            raise KeyError(f"{name} is sampled in {COMPACT_REFERENCE.name}: compare with differences()")
        return self.data[name]

    def __contains__(self, name: str) -> bool:
        return name in self.data or name in self.sampled

    def differences(self, name: str, actual) -> dict[str, float]:
        """Max abs differences of `actual` from the official tensor: at the samples, and of the channel mean/std."""
        actual = np.asarray(actual, dtype=np.float64)
        if name not in self.sampled:
            return {"max_abs": float(np.max(np.abs(actual - self.data[name].astype(np.float64))))}
        shape = tuple(self.data[f"{name}.shape"])
        assert actual.shape == shape, f"{name}: shape {actual.shape} != {shape}"
        axes = tuple(a for a in range(actual.ndim) if a != 1)
        at = actual.reshape(-1)[self.data[f"{name}.index"]]
        return {"max_abs": float(np.max(np.abs(at - self.data[f"{name}.value"]))),
                "channel_mean": float(np.max(np.abs(actual.mean(axis=axes) - self.data[f"{name}.channel_mean"]))),
                "channel_std": float(np.max(np.abs(actual.std(axis=axes) - self.data[f"{name}.channel_std"])))}


@pytest.fixture(scope="session")
def reference() -> CompactReference:
    """The compact official vectors (always present)."""
    return CompactReference(COMPACT_REFERENCE)


@pytest.fixture(scope="session")
def animal_reference() -> CompactReference:
    """The compact official vectors of the Animals mode (always present)."""
    return CompactReference(COMPACT_ANIMALS, ("source",))


@pytest.fixture(scope="session")
def full_reference() -> dict[str, np.ndarray]:
    """The full official vectors from shared/reference (optional: the test skips without them)."""
    return dict(np.load(need_shared(REFERENCE / "public" / "ref_seed0_s0_d30.npz")))


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


ANIMAL_SEED = 3      # the synthetic animal weights of the official Animals vectors


@pytest.fixture(scope="session")
def tiny_animal_weights_dir(tmp_path_factory):
    from liveportrait_triton.weights import write_synthetic_weights
    out = tmp_path_factory.mktemp("weights_tiny_animals_seed3")
    write_synthetic_weights(out, seed=ANIMAL_SEED, config="tiny", subject="animal")
    return out


@pytest.fixture(scope="session")
def tiny_animal_networks(tiny_weights_dir, tiny_animal_weights_dir):
    """The tiny animal set (seed 3) with the human set's stitching MLP (seed 0), as the Animals mode loads it."""
    from liveportrait_triton.weights import load_networks
    return load_networks(tiny_weights_dir, "tiny", tiny_animal_weights_dir)


@pytest.fixture(scope="session")
def full_networks(full_weights_dir):
    from liveportrait_triton.weights import load_networks
    return load_networks(full_weights_dir, "full")


@pytest.fixture(scope="session")
def tiny_networks(tiny_weights_dir):
    from liveportrait_triton.weights import load_networks
    return load_networks(tiny_weights_dir, "tiny")


# ---------------------------------------------------------------------------------------------------------------
# Triton server fixtures: a tiny-network repository exported from the session's synthetic weights, real media
# crops, and a server on loopback with free ports (module-scoped: one per test module that asks for it).

SERVER_FRAMES = 4   # driving frames of d0.mp4 used by the server tests


def to_crop(bgr: np.ndarray) -> np.ndarray:
    """A BGR image resized whole to a 256x256 RGB uint8 crop (the server tests need real pixels, not face crops)."""
    import cv2
    return cv2.cvtColor(cv2.resize(bgr, (256, 256), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def driving_crops() -> list[np.ndarray]:
    """The first SERVER_FRAMES frames of driving/d0.mp4, resized to 256x256 RGB uint8."""
    import cv2
    capture = cv2.VideoCapture(str(ASSETS / "driving" / "d0.mp4"))
    frames = []
    while len(frames) < SERVER_FRAMES:
        ok, frame = capture.read()
        if not ok:
            pytest.fail(f"{ASSETS / 'driving' / 'd0.mp4'} has fewer than {SERVER_FRAMES} frames")
        frames.append(to_crop(frame))
    capture.release()
    return frames


@pytest.fixture(scope="session")
def source_crops() -> dict[str, np.ndarray]:
    import cv2
    crops = {}
    for name in ("s0", "s1"):
        image = cv2.imread(str(ASSETS / "source" / f"{name}.jpg"))
        if image is None:
            pytest.fail(f"cannot read {ASSETS / 'source' / name}.jpg")
        crops[name] = to_crop(image)
    return crops


@pytest.fixture(scope="session")
def full_repository(full_networks, tmp_path_factory):
    """The full-size networks (synthetic seed 0: the parity weights) exported at batch 1 with the served runtime
    choice and rendered for the local target: (repository, the export's validation records)."""
    from liveportrait_triton import repository as repo
    from liveportrait_triton.export.onnx_export import export_repository
    from liveportrait_triton.runtimes import runtime_plan
    out = tmp_path_factory.mktemp("repository_full")
    exported = export_repository(full_networks, out, "decomposed", (1,), plan=runtime_plan("local"),
                                 log=lambda _: None)
    repo.write_repository_configs(out, "local", "full")
    return out, exported


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, tiny_weights_dir) -> Path:
    """`liveportrait-triton export --precision exact` of the tiny networks (session weights) into a local-target
    repository: exact, so that served frames compare with the in-process fp32 pipeline on every machine class (the
    reduced policy is tested in test_precision.py)."""
    from liveportrait_triton.cli import main
    out = tmp_path_factory.mktemp("repository_tiny")
    code = main(["export", "--weights", str(tiny_weights_dir), "--config", "tiny", "--repository", str(out),
                 "--validate-batches", "1", "--precision", "exact"])
    if code != 0:
        pytest.fail(f"export of the tiny repository failed with status {code}")
    return out


@pytest.fixture(scope="session")
def tiny_both_repository(tmp_path_factory, tiny_repository, tiny_animal_networks) -> Path:
    """The tiny repository's human set plus the tiny animal set exported beside it: one repository, both sets."""
    from liveportrait_triton import repository as repo
    from liveportrait_triton import spec
    from liveportrait_triton.export.onnx_export import export_repository
    from liveportrait_triton.runtimes import runtime_plan
    out = tmp_path_factory.mktemp("repository_tiny_both")
    repo.copy_artefacts(tiny_repository, out)
    both = (spec.HUMAN, spec.ANIMAL)
    plan = runtime_plan("local", subjects=both)
    export_repository(tiny_animal_networks, out, "decomposed", (1,), models=spec.ANIMAL_SUBMODELS, plan=plan,
                      log=lambda _: None)
    repo.write_repository_configs(out, "local", "tiny", plan=plan, subjects=both)
    return out


@pytest.fixture(scope="module")
def tiny_both_server(tiny_both_repository, tmp_path_factory):
    """The bundled Triton server with both model sets (tiny networks) on 127.0.0.1, free ports."""
    yield from running_server(tiny_both_repository, tmp_path_factory)


def running_server(repository: Path, tmp_path_factory):
    """The bundled Triton server on `repository`, 127.0.0.1, free ports, while the generator runs (a fixture
    body); its log stays in tmp."""
    from liveportrait_triton.serve import TritonServer
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    with TritonServer(repository, log_file=log) as server:
        yield server


def serve_command(repository: Path) -> tuple[list[str], list[int]]:
    """`liveportrait-triton serve` of `repository` on free loopback ports, and the ports (http, grpc, metrics)."""
    from liveportrait_triton.serve import free_port
    ports = [free_port() for _ in range(3)]
    return [sys.executable, "-m", "liveportrait_triton", "serve", "--repository", str(repository),
            "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])], ports


def rendered_copy(repository: Path, destination: Path, plan=None, **serving) -> Path:
    """A copy of a tiny repository's ONNX files with configs re-rendered using other ServingOptions (and another
    runtime plan, when given)."""
    from liveportrait_triton import repository as repo
    repo.copy_artefacts(repository, destination)
    repo.write_repository_configs(destination, "local", "tiny", options=repo.ServingOptions(**serving), plan=plan)
    return destination


@pytest.fixture(scope="module")
def tiny_server(tiny_repository, tmp_path_factory):
    """The bundled Triton server on the tiny repository, 127.0.0.1, free ports; its log stays in tmp."""
    yield from running_server(tiny_repository, tmp_path_factory)


BATCHING_WINDOW_US = 2_000_000     # the batching tests' pipeline queue delay: far longer than a loaded machine needs


@pytest.fixture(scope="session")
def batching_server(tiny_repository, tmp_path_factory):
    """A tiny server whose pipeline waits BATCHING_WINDOW_US for other sequences' requests before it executes,
    so requests sent together are batched even on a loaded machine (the default 5 ms window can be missed there).
    Only the tests that assert batching use it: every lone request waits the whole window."""
    from liveportrait_triton.serve import TritonServer
    repository = rendered_copy(tiny_repository, tmp_path_factory.mktemp("repository_batching"),
                               pipeline_queue_delay_us=BATCHING_WINDOW_US)
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("triton_log") / "tritonserver.log") as server:
        yield server


IMAGE_MAX_DIFF = 1        # uint8 levels: batching and ONNX Runtime vs PyTorch move a few pixels by one level
IMAGE_MEAN_DIFF = 0.01    # mean |diff| over all pixels and channels


def assert_images_close(actual: np.ndarray, expected: np.ndarray, what: str = "image") -> None:
    """uint8 images equal within IMAGE_MAX_DIFF per pixel and IMAGE_MEAN_DIFF on average."""
    assert actual.dtype == np.uint8 and actual.shape == expected.shape, f"{what}: {actual.dtype} {actual.shape}"
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= IMAGE_MAX_DIFF and diff.mean() <= IMAGE_MEAN_DIFF, (
        f"{what}: max |diff| {diff.max()} (bound {IMAGE_MAX_DIFF}), mean {diff.mean():.5f} (bound {IMAGE_MEAN_DIFF})")


def server_metric(server, name: str, **labels) -> float:
    """One sample of a running server's Prometheus metrics (the pipeline's custom metrics included)."""
    import urllib.request
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} {labels} not found on {server.metrics_url}")
