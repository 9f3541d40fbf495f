"""The container's serving path on a real Triton server: the bundled Triton 2.51 (the NGC image runs 2.53).

The repository is exported here (tiny networks, local target, since this machine has no GPU), assembled into a
served repository of links by docker/gpu_sharing.py exactly as the container does, and served with the
tritonserver command line that docker/entrypoint.py builds, changed only to listen on loopback at free ports and
to find the bundled Python backend. Checked: every flag exists in this Triton, the server becomes ready, the health
check script agrees, the restricted APIs need the admin key, model control is off, a frame animates through the
linked repository, and the metrics the autoscaler's adapter rule reads exist with the model labels it filters on.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ASSETS
from liveportrait_triton import spec
from liveportrait_triton.serve import ADMIN_HEADER, find_triton, free_port, prepare_backend_dir

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "deploy-test-admin-key"


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPORTRAIT_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "docker" / name), *args], capture_output=True, text=True,
                          env=environment, timeout=900)


def server_environment(install) -> dict:
    """As liveportrait_triton.serve.TritonServer.environment: this venv first on PATH, the wheel's libraries."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libs = [str(install.libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def http(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:       # not listening (yet)
        return 0, str(exc)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(argv as the entrypoint built it, ports) of a running bundled Triton on the assembled repository."""
    root = tmp_path_factory.mktemp("deploy_server")
    cached, runtime = root / "cache" / "repository", root / "runtime-repository"
    export = subprocess.run([sys.executable, "-m", "liveportrait_triton", "export", "--synthetic", "0", "--config", "tiny",
                             "--target", "local", "--repository", str(cached)], capture_output=True, text=True,
                            timeout=900)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assembled = script("gpu_sharing.py", "assemble", "--source", str(cached), "--out", str(runtime))
    assert assembled.returncode == 0, assembled.stderr
    install = find_triton()
    built = script("entrypoint.py", "triton-command", "--repository", str(runtime), "--gpu-count", "0",
                   "--tritonserver", str(install.binary), env={"LIVEPORTRAIT_ADMIN_KEY": ADMIN_KEY})
    assert built.returncode == 0, built.stderr
    argv = json.loads(built.stdout)
    ports = {kind: free_port() for kind in ("http", "grpc", "metrics")}
    local = [re.sub(r"^--(http|grpc|metrics)-port=\d+$", lambda m: f"--{m.group(1)}-port={ports[m.group(1)]}", a)
             for a in argv]
    shm_prefix = f"lpdeploy{os.getpid()}_"
    local += [f"--{kind}-address=127.0.0.1" for kind in ports] + [
        f"--backend-directory={prepare_backend_dir(install)}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
    log = open(root / "tritonserver.log", "wb")
    process = subprocess.Popen(local, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=server_environment(install), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while http(f"http://127.0.0.1:{ports['http']}/v2/health/ready")[0] != 200:
            if not _alive(process) or time.monotonic() > deadline:
                pytest.fail("Triton exited or was not ready within 300 s:\n"
                            + (root / "tritonserver.log").read_text()[-3000:])
            time.sleep(0.5)
        yield argv, ports
    finally:
        _stop(process)
        log.close()
        for leftover in Path("/dev/shm").glob(f"{shm_prefix}*"):
            leftover.unlink(missing_ok=True)


def _alive(process) -> bool:
    return process.poll() is None


def _stop(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def test_every_flag_of_the_command_exists_in_triton():
    install = find_triton()
    built = script("entrypoint.py", "triton-command", "--repository", "/nowhere", "--gpu-count", "1",
                   "--tritonserver", str(install.binary))
    assert built.returncode == 0, built.stderr
    argv = json.loads(built.stdout)
    shown = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True,
                           env=server_environment(install))
    help_text = shown.stdout + shown.stderr
    known = set(re.findall(r"(--[a-z0-9-]+)", help_text))
    assert len(known) > 50, help_text[:500]
    unknown = sorted({a.split("=", 1)[0] for a in argv[1:]} - known)
    assert not unknown, f"tritonserver {install.version} does not know {unknown}"


def test_server_is_ready_and_the_health_check_script_agrees(served):
    _, ports = served
    for probe in ("ready", "live"):
        result = script("healthcheck.py", probe, "--port", str(ports["http"]))
        assert result.returncode == 0, result.stderr
    closed = script("healthcheck.py", "ready", "--port", str(free_port()))
    assert closed.returncode == 1 and "refused" in closed.stderr.lower()
    models = json.loads(http(f"http://127.0.0.1:{ports['http']}/v2/repository/index", "POST",
                             {ADMIN_HEADER: ADMIN_KEY}, b"{}")[1])
    assert {m["name"] for m in models if m.get("state") == "READY"} == {*spec.SUBMODELS, spec.PIPELINE}


def test_restricted_apis_need_the_admin_key_and_models_cannot_be_loaded(served):
    _, ports = served
    base = f"http://127.0.0.1:{ports['http']}"
    status, body = http(f"{base}/v2/repository/index", "POST", body=b"{}")
    assert status == 403, (status, body)
    status, _ = http(f"{base}/v2/repository/index", "POST", {ADMIN_HEADER: "wrong"}, b"{}")
    assert status == 403
    status, body = http(f"{base}/v2/repository/models/{spec.STITCHING}/unload", "POST", {ADMIN_HEADER: ADMIN_KEY}, b"{}")
    assert status >= 400 and "not allowed" in body.lower(), (status, body)
    assert http(f"{base}/v2/health/ready")[0] == 200, "the model stays loaded"
    status, _ = http(f"{base}/v2/models/{spec.PIPELINE}/config")        # the client reads configs: not restricted
    assert status == 200


def test_a_frame_animates_through_the_linked_repository_and_queue_metrics_appear(served):
    import cv2

    from liveportrait_triton.client import DrivingFrame, LivePortraitClient, SourceInput
    _, ports = served

    def crop(path: Path) -> np.ndarray:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert image is not None, path
        return np.ascontiguousarray(cv2.resize(image, (256, 256))[:, :, ::-1])

    with LivePortraitClient(f"127.0.0.1:{ports['grpc']}") as client:
        image = client.animate_image(SourceInput(crop(ASSETS / "source" / "s0.jpg")),
                                     DrivingFrame(crop=crop(ASSETS / "driving" / "d30.jpg")))
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and image.std() > 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).read().decode()
    config = yaml.safe_load((REPO / "deploy" / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    series = sorted(set(re.findall(r"rate\((\w+)\{", rule["metricsQuery"])))
    assert series == ["nv_inference_queue_duration_us", "nv_inference_request_success"]
    for model in (spec.WARPING, spec.GENERATOR):
        for name in series:
            assert re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} \d', metrics, re.M), (name, model)
        assert re.search(rf'^nv_inference_request_success{{[^}}]*model="{model}"[^}}]*}} [1-9]', metrics, re.M)
