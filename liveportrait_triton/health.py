"""Whether a Triton server can serve: its health endpoint answers 200 and no Python-backend stub has died.

Triton 2.51 does not restart a Python-backend stub that died (SIGKILL, OOM): it keeps reporting the server and the
model ready and live while every request to that model fails ("Stub process '<instance>' is not healthy."). So
health here is Triton's own endpoint plus one more rule: every instance of a loaded Python-backend model has its
stub process running. The rule needs no memory of earlier checks (the expected instances come from the server's
model statistics and configs, the running stubs from /proc), so a one-shot probe applies it as well as a watcher.

The one implementation, used by `liveportrait-triton serve` and the GPU image's entrypoint (`watch`, which stop
the server, so the process or container exits), and by docker/healthcheck.py (the image's HEALTHCHECK and the
Kubernetes probes).
"""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
PROBE_PATHS = {"ready": "/v2/health/ready", "live": "/v2/health/live"}
TIMEOUT_S = 3.0


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")


def _state_and_parent(pid: int) -> tuple[str, int]:
    state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def server_process(http_port: int) -> int | None:
    """The pid of the tritonserver serving HTTP on `http_port` (its argv has --http-port=PORT), or None."""
    for pid in _processes():
        try:
            argv = _argv(pid)
        except OSError:         # ended meanwhile, or not ours to read
            continue
        if Path(argv[0]).name == "tritonserver" and f"--http-port={http_port}" in argv:
            return pid
    return None


def stub_processes(server_pid: int) -> dict[str, int]:
    """The running (not zombie) Python-backend stubs of a server: model instance name -> pid."""
    stubs = {}
    for pid in _processes():
        try:
            argv = _argv(pid)
            state, parent = _state_and_parent(pid)
        except OSError:
            continue
        if parent == server_pid and state != "Z" and argv[0].endswith(STUB_NAME) and len(argv) > 2:
            stubs[argv[-2]] = pid       # argv: stub, model.py, shm, ..., instance name, runtime
    return stubs


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def python_instances(http_url: str) -> list[str]:
    """Instance names of every loaded Python-backend model (from the server's statistics and model configs)."""
    status, body = _get(f"http://{http_url}/v2/models/stats")
    if status != 200:
        return []
    names = []
    for model in sorted({m["name"] for m in json.loads(body).get("model_stats", [])}):
        status, body = _get(f"http://{http_url}/v2/models/{model}/config")
        config = json.loads(body) if status == 200 else {}
        if config.get("backend") != "python":
            continue
        for index, group in enumerate(config.get("instance_group", [])):
            per_device = max(len(group.get("gpus", [])), 1) if group.get("kind") == "KIND_GPU" else 1
            group_name = group.get("name") or f"{model}_{index}"
            names += [f"{group_name}_{i}" for i in range(int(group.get("count", 1)) * per_device)]
    return names


def dead_stubs(http_url: str, server_pid: int) -> list[str]:
    """Instances of loaded Python-backend models whose stub process is not running (it died: Triton does not
    restart it, and only a restart of the server recovers)."""
    running = stub_processes(server_pid)
    return sorted(name for name in python_instances(http_url) if name not in running)


def problems(http_port: int, probe: str = "ready", host: str = "127.0.0.1") -> list[str]:
    """Why the server on `http_port` cannot serve (empty: healthy). `ready`: every model loaded and every stub
    running; `live`: the server process serves and every stub of a loaded model runs."""
    url = f"http://{host}:{http_port}{PROBE_PATHS[probe]}"
    try:
        status, _ = _get(url)
    except (urllib.error.URLError, OSError) as exc:
        return [f"{url}: {getattr(exc, 'reason', exc)}"]
    if status != 200:
        return [f"{url}: HTTP {status}"]
    server = server_process(http_port)
    if server is None:
        return [f"no tritonserver process with --http-port={http_port} is visible here"]
    try:
        dead = dead_stubs(f"{host}:{http_port}", server)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [f"the server's model configs could not be read ({exc})"]
    return [f"the Python-backend process of {name} died (Triton does not restart it; every request to that model "
            "fails): restart the server" for name in dead]


def watch(process: subprocess.Popen, http_url: str, stop: threading.Event, interval_s: float = 1.0) -> str | None:
    """Block until `stop` is set (None), the server `process` exits or a stub of a loaded model dies (the reason,
    one line). Checks that cannot reach the server (still starting, or busy) are skipped, not failures."""
    while not stop.wait(interval_s):
        if process.poll() is not None:
            return f"Triton exited with status {process.returncode}"
        try:
            dead = dead_stubs(http_url, process.pid)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if dead:
            return (f"the Python-backend process of {', '.join(dead)} died; Triton does not restart it and would "
                    "fail every request to that model")
    return None


def supervise(argv: list[str], stop_timeout_s: float = 30.0) -> int:
    """Run tritonserver (`argv`, which names --http-port=PORT) as a child and `watch` it: SIGTERM and SIGINT are
    passed on and its exit status returned; a dead stub stops it and returns 1, so that a container exits and its
    restart policy (or Kubernetes) starts a healthy one. Must run on the main thread (signal handlers)."""
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--http-port="))
    process = subprocess.Popen(argv)
    stop = threading.Event()

    def forward(sig, _frame):
        process.send_signal(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    reason = watch(process, f"127.0.0.1:{port}", stop, interval_s=5.0)
    if reason is None or process.poll() is not None:
        return process.wait()
    print(f"error: {reason}: stopping Triton (restart it)", flush=True)
    process.terminate()
    try:
        process.wait(timeout=stop_timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return 1
