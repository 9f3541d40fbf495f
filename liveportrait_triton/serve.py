"""Run the real Triton server bundled in the `nvidia-pytriton` wheel on a model repository.

`TritonServer` (a context manager used by the CLI, tests, client, benchmarks and demo) finds the `tritonserver`
binary and its libraries inside the installed wheel, prepares a backend directory holding the Python backend and the
stub built for the running Python (cached), starts the server in its own process group with this interpreter's
environment first on PATH (so the stub's embedded Python imports this venv and this package), waits until every
model of the repository is ready, and stops the whole process group on exit. Defaults are conservative: loopback
only, no model control, the model-repository / shared-memory / logging / trace APIs restricted to a key.

`liveportrait-triton serve --repository DIR` is the command-line front end.

Triton 2.51 has no flag for the gRPC message size: its server accepts messages up to 2 GiB and tritonclient's
channel does too. Our largest messages are far below any limit (a START with source and driving crop: 0.4 MB; a
response: one 512x512 RGB crop, 0.8 MB), so nothing needs raising; a deployment behind a proxy should allow 2 MB.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import health

RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
ADMIN_HEADER = "lp-admin-key"                                  # HTTP header carrying the admin key
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"     # the same over gRPC (Triton prefixes the name)
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# Largest HTTP request body accepted (where Triton has --http-max-input-size). A START request is a 196 KiB crop
# (about 1 MiB as JSON); 16 MiB leaves room for binary batches of a few frames and nothing more.
HTTP_MAX_INPUT_BYTES = 16 * 2 ** 20
# Inference response objects kept per gRPC stream (where Triton has --grpc-max-response-pool-size): bounds the
# memory a client that stops reading can pin; the client keeps at most a few frames in flight.
GRPC_MAX_RESPONSE_POOL = 64
CONDITIONAL_FLAGS = {"--http-max-input-size": str(HTTP_MAX_INPUT_BYTES),
                     "--grpc-max-response-pool-size": str(GRPC_MAX_RESPONSE_POOL)}


def triton_command(binary: str | Path, repository: str | Path, *, network_config: str, admin_key: str,
                   ports: dict[str, int] = DEFAULT_PORTS, host: str | None = None,
                   backend_dir: str | Path | None = None, shm_prefix: str | None = None, gpu_count: int = 0,
                   cuda_pool_bytes: int = 0, exit_timeout_s: int = 30, log_verbose: int = 0,
                   supported_flags: set[str] = frozenset(), extra_args: tuple[str, ...] = ()) -> list[str]:
    """The tritonserver argv, for the bundled server (`TritonServer`) and the GPU image (`docker/entrypoint.py`).

    Secure defaults: no model control, strict readiness, SageMaker and Vertex AI off, the restricted APIs behind
    `admin_key`. The Python backend's shared-memory regions follow from the spec (`python_shm_bytes` of the
    network configuration). `host` binds every endpoint to one address (default: all); `backend_dir` and
    `shm_prefix` are the bundled server's; one CUDA memory pool of `cuda_pool_bytes` per GPU; the flags of
    CONDITIONAL_FLAGS only where this Triton lists them in `supported_flags`.
    """
    from .repository import python_shm_bytes
    restricted = ",".join(RESTRICTED_APIS)
    shm = python_shm_bytes(network_config)
    command = [
        str(binary),
        f"--model-repository={repository}",
        "--model-control-mode=none",
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    for kind in ("http", "grpc", "metrics"):
        if host is not None:
            command.append(f"--{kind}-address={host}")
        command.append(f"--{kind}-port={ports[kind]}")
    command += [
        "--allow-metrics=true",
        f"--allow-gpu-metrics={'true' if gpu_count else 'false'}",
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
        f"--http-restricted-api={restricted}:{ADMIN_HEADER}={admin_key}",
        f"--grpc-restricted-protocol={restricted}:{ADMIN_HEADER}={admin_key}",
        f"--backend-config=python,shm-default-byte-size={shm}",
        f"--backend-config=python,shm-growth-byte-size={shm}",
        f"--log-verbose={log_verbose}",
    ]
    if backend_dir is not None:
        command.append(f"--backend-directory={backend_dir}")
    if shm_prefix is not None:
        command.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    command += [f"--cuda-memory-pool-byte-size={gpu}:{cuda_pool_bytes}" for gpu in range(gpu_count)]
    command += [f"{flag}={value}" for flag, value in CONDITIONAL_FLAGS.items() if flag in supported_flags]
    return command + list(extra_args)


class ServerError(RuntimeError):
    """The server could not be started or stopped as asked (the message says why)."""


@dataclasses.dataclass(frozen=True)
class TritonInstallation:
    """Where the wheel keeps the server: binary, bundled shared libraries, Python backend, per-Python stubs."""
    root: Path            # .../site-packages/pytriton/tritonserver
    libs: Path            # .../site-packages/nvidia_pytriton.libs
    version: str          # nvidia-pytriton version

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_version: str | None = None) -> Path:
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_triton() -> TritonInstallation:
    """Locate the server inside the installed `nvidia-pytriton` wheel (without importing pytriton)."""
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise ServerError("the Triton server comes with the nvidia-pytriton wheel, which is not installed: "
                          "pip install --no-deps nvidia-pytriton==0.7.0")
    package = Path(list(found.submodule_search_locations)[0])
    install = TritonInstallation(root=package / "tritonserver", libs=package.parent / "nvidia_pytriton.libs",
                                 version=importlib.metadata.version("nvidia-pytriton"))
    for path in (install.binary, install.libs, install.python_backend, install.stub()):
        if not path.exists():
            raise ServerError(f"{path} is missing from the nvidia-pytriton installation"
                              + (" (no Python-backend stub for this Python version)" if path == install.stub() else ""))
    return install


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "liveportrait-triton"


def prepare_backend_dir(install: TritonInstallation, cache_dir: str | Path | None = None) -> Path:
    """A Triton backend directory (`<dir>/python/...`) with the Python backend and the stub of this Python.

    Built once per wheel version and Python version under the cache directory; built in a temporary directory
    and renamed into place, so concurrent servers never see a half-copied backend.
    """
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = Path(cache_dir or default_cache_dir()) / f"backends-pytriton{install.version}-py{python}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        (staging / "python").mkdir()
        for name in PYTHON_BACKEND_FILES:
            shutil.copy2(install.python_backend / name, staging / "python" / name)
        shutil.copy2(install.stub(python), staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(target)
        except OSError:          # another process finished first
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on host now (the OS picks it) and that this process has not handed out before.

    The OS may give a port it just released to the next bind(0), so choosing a server's HTTP, gRPC and metrics ports
    (or a cluster's) one after another could return one port twice (seen: "cannot listen to HTTP requests and GRPC
    requests at the same address and port").
    """
    held = []
    try:
        with _ports_lock:
            while True:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)      # kept bound until a new port is found, so the OS cannot offer it again
                sock.bind((host, 0))
                port = sock.getsockname()[1]
                if port not in _ports_handed_out:
                    _ports_handed_out.add(port)
                    return port
    finally:
        for sock in held:
            sock.close()


def repository_models(repository: Path) -> list[str]:
    """Model names of a repository: the sub-directories that hold a config.pbtxt."""
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*)")
_TABLE_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.*?)\s*\|?\s*$")
_PORT_IN_USE = re.compile(r"failed to start (\w+) service: .*?Socket '([^']+)' already in use", re.IGNORECASE)


def explain_log(log: str) -> str:
    """The reasons a server failed, from its log: models that failed to load (and why), ports already in use."""
    reasons: dict[str, str] = {}
    for line in log.splitlines():
        if (m := _LOAD_FAILURE.search(line)) or (m := _TABLE_ROW.search(line.strip())):
            reason = m.group(2).split("\\n")[0].strip().rstrip('"').strip()    # drop the backend's traceback
            reasons.setdefault(f"model {m.group(1)!r} failed to load", reason)
        elif m := _PORT_IN_USE.search(line):
            reasons[f"{m.group(1)} port"] = f"{m.group(2)} is already in use"
    if not reasons:
        tail = [line for line in log.splitlines() if line.strip()][-15:]
        return "no reason found in the server log; its last lines:\n  " + "\n  ".join(tail)
    return "\n".join(f"{what}: {why}" for what, why in reasons.items())


class TritonServer:
    """The bundled Triton server on a model repository, as a context manager.

    Ports left as None are chosen free on `host`. The server receives SIGTERM if the thread that started it dies
    (Linux parent-death signal), so start it from a thread that outlives it (the main thread, typically).
    `admin_key` grants the restricted APIs (model-repository, shared-memory, logging, trace) to requests carrying
    the header `lp-admin-key: <key>` (HTTP) or `triton-grpc-protocol-lp-admin-key: <key>` (gRPC metadata); by
    default a random key is generated and not shown, which leaves them disabled.
    """

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, admin_key: str | None = None,
                 log_file: str | Path | None = None, log_verbose: int = 0, startup_timeout_s: float = 300.0,
                 cache_dir: str | Path | None = None, extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository).resolve()
        self.host = host
        self.ports = {"http": http_port or free_port(host), "grpc": grpc_port or free_port(host),
                      "metrics": metrics_port or free_port(host)}
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.cache_dir = cache_dir
        self.extra_args = tuple(extra_args)
        self._own_log_dir = None if log_file else tempfile.mkdtemp(prefix="liveportrait-triton-log-")
        self.log_file = Path(log_file) if log_file else Path(self._own_log_dir) / "tritonserver.log"
        self.shm_prefix = f"lp{os.getpid()}x{self.ports['grpc']}_"
        self.process: subprocess.Popen | None = None
        self._became_ready = False
        self.keep_log = False           # set to keep a temporary log folder after a clean stop (e.g. after an error)

    # -- endpoints -------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.is_file() else ""

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self, install: TritonInstallation, backend_dir: Path) -> list[str]:
        from .repository import repository_network_config
        return triton_command(install.binary, self.repository, network_config=repository_network_config(self.repository),
                              admin_key=self.admin_key, ports=self.ports, host=self.host, backend_dir=backend_dir,
                              shm_prefix=self.shm_prefix, exit_timeout_s=20, log_verbose=self.log_verbose,
                              extra_args=self.extra_args)

    def environment(self, install: TritonInstallation) -> dict[str, str]:
        """This interpreter's bin directory first on PATH (the stub's Python finds this venv through it), and
        the wheel's libraries plus libpython's directory on LD_LIBRARY_PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(install.libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("server already started")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        models = repository_models(self.repository)
        if not models:
            raise ServerError(f"model repository {self.repository} holds no model (no */config.pbtxt)")
        taken = [f"{kind} port {port}" for kind, port in self.ports.items() if not port_is_free(self.host, port)]
        if taken:
            raise ServerError(f"{', '.join(taken)} already in use on {self.host}: choose other ports")
        install = find_triton()
        backend_dir = prepare_backend_dir(install, self.cache_dir)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command(install, backend_dir), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(install),
                                            start_new_session=True,
                                            preexec_fn=_terminate_with_parent if _on_main_thread() else None)
        try:
            self._wait_ready(models)
            self._became_ready = True
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"Triton exited with status {self.process.returncode} while starting:\n"
                                  f"{explain_log(self.log_text())}\n(full log: {self.log_file})")
            if self._ready("/v2/health/ready") and all(self._ready(f"/v2/models/{m}/ready") for m in models):
                return
            time.sleep(0.25)
        raise ServerError(f"Triton did not become ready within {self.startup_timeout_s:g} s:\n"
                          f"{explain_log(self.log_text())}\n(full log: {self.log_file})")

    def _ready(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stub_processes(self) -> dict[str, int]:
        """The running Python-backend stubs of this server: model instance name (e.g. 'warping_module_0_0') -> pid."""
        return health.stub_processes(self.process.pid) if self.alive() else {}

    def dead_stubs(self) -> list[str]:
        """Model instances whose stub process died (health.dead_stubs: Triton 2.51 does not restart a dead stub
        and keeps reporting the model ready, while every request to it fails)."""
        if not self.alive():
            return []
        try:
            return health.dead_stubs(self.http_url, self.process.pid)
        except (urllib.error.URLError, OSError, ValueError):      # not answering now (busy): nothing is known dead
            return []

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's process group (server and stubs), SIGKILL after timeout_s; no orphans left."""
        if self.process is None:
            return
        group = self.process.pid      # the server leads its own session and process group
        _signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            self.process.wait()
        deadline = time.monotonic() + 10
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        self.process = None
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._own_log_dir is not None and self._became_ready and not self.keep_log:   # a failed start keeps it
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def endpoints(self) -> str:
        return (f"HTTP    http://{self.http_url}\nGRPC    {self.grpc_url}\nmetrics {self.metrics_url}")


def _on_main_thread() -> bool:
    """PR_SET_PDEATHSIG fires when the *thread* that forked exits: tie the server's life to the starter only when
    that is the main thread (a server started from a worker thread would die with the thread)."""
    return threading.current_thread() is threading.main_thread()


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the starting thread dies, so that a killed client (OOM, SIGKILL)
    leaves no server behind; the server then stops its stubs itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind HTTP, gRPC and metrics to (default loopback only; 0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"])
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"])
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS["metrics"])
    parser.add_argument("--admin-key", default=os.environ.get("LIVEPORTRAIT_ADMIN_KEY"),
                        help="key for the restricted APIs: model-repository, shared-memory, logging, trace (HTTP "
                             "header lp-admin-key, gRPC metadata triton-grpc-protocol-lp-admin-key; default: "
                             "$LIVEPORTRAIT_ADMIN_KEY, else a random key nobody is told, i.e. those APIs are "
                             "disabled). Local users can read it in the server's command line")
    parser.add_argument("--log-file", metavar="PATH",
                        help="server log (default: a temporary file, printed, removed after a clean stop)")
    parser.add_argument("--keep-log", action="store_true",
                        help="keep the temporary log after a clean stop (it is always kept after an error)")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton verbose log level")
    parser.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for every model to be ready")


def active_precisions(repository: str | Path) -> list[str]:
    """One line per served sub-network of a local-target repository: the runtime and precision it runs on this
    machine (its config's plan entry, or the exact entry it falls back to where this CPU has no native bf16, as
    the served model itself decides at load: runtimes.native_entry)."""
    from . import runtimes
    from .precision import machine_class
    from .repository import served_plan
    try:
        plan = served_plan(repository)
    except (OSError, ValueError):      # an ngc repository, or none of our sub-network configs
        return []
    lines = [f"precision (machine class {machine_class()}):"]
    for model, entry in plan.items():
        active, fallback = runtimes.native_entry(entry)
        lines.append(f"  {model}: {active.label()}" + (f"  ({fallback})" if fallback else ""))
    return lines


def run(args) -> int:
    server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, admin_key=args.admin_key, log_file=args.log_file,
                          log_verbose=args.log_verbose, startup_timeout_s=args.startup_timeout)
    server.keep_log = args.keep_log
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: the endpoints have no TLS and no authentication for inference",
              file=sys.stderr)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting Triton on {server.repository} (log: {server.log_file}) ...", flush=True)
        try:
            server.start()
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        models = ", ".join(repository_models(server.repository))
        print("\n".join(active_precisions(server.repository)), flush=True)
        print(f"ready: {models}\n{server.endpoints()}\nweb page: liveportrait-triton ui --server {server.grpc_url} "
              f"--metrics-url {server.metrics_url}\nCtrl-C to stop", flush=True)
        reason = health.watch(server.process, server.http_url, stop)
        if reason is not None:
            server.keep_log = True
            detail = f":\n{explain_log(server.log_text())}" if not server.alive() else ": stopping the server (restart it)"
            print(f"error: {reason}{detail}\n(full log: {server.log_file})", file=sys.stderr)
            return 1
        print("stopping ...", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server.log_file.is_file() and args.log_file is None:
            print(f"the server log is kept in {server.log_file}", file=sys.stderr)
