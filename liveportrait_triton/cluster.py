"""Several Triton replicas behind HAProxy, every sequence pinned to one replica by its session header.

A LivePortrait stream keeps state (source features, anchor motion) in the replica that saw its START, so every
request of a sequence must reach that replica. The proxy hashes the request header `x-liveportrait-session`
(`spec.SESSION_HEADER`; the client sets it to the sequence id on every request and on every gRPC stream)
consistently onto the replicas that pass their health check: a replica that fails leaves the ring and only its
sessions move. A gRPC stream is one HTTP/2 stream and so stays on one replica anyway; the header makes separate
unary requests of a sequence stick too.

`render_proxy_config` is the one place the proxy configuration is written: `liveportrait-triton cluster` renders it
for replicas on loopback, and deploy/k8s/router.yaml holds its rendering for the replicas of a Kubernetes headless
Service (a test re-renders it and fails on any difference). HAProxy (Debian package `haproxy`, 2.6) was chosen over
nginx because open-source nginx has no active health checks.

`liveportrait-triton cluster --repository DIR --replicas N` starts N bundled servers (`serve.TritonServer`) and
HAProxy in front of them, prints the one address clients use, and stops everything on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import spec
from .repository import ServingOptions
from .serve import (DEFAULT_PORTS, ServerError, TritonServer, _on_main_thread, _terminate_with_parent, free_port,
                    port_is_free)

PROXY_PACKAGE = "haproxy"          # Debian package (scripts/install.sh installs it)
HEALTH_PATH = "/v2/health/ready"   # ready only when every model is loaded (the servers run with strict readiness)
STREAM_IDLE_TIMEOUT_S = ServingOptions().sequence_idle_timeout_s   # the pipeline frees an idle sequence then
LOG_FIELDS = ("frontend", "server", "status", "path", "session")   # one proxy log line per request or stream


class ClusterError(RuntimeError):
    """The proxy or a replica could not be started as asked (the message says why)."""


@dataclasses.dataclass(frozen=True)
class LoopbackReplicas:
    """Replicas at known addresses: `name -> (host, grpc_port, http_port)`."""
    addresses: dict[str, tuple[str, int, int]]


@dataclasses.dataclass(frozen=True)
class DnsReplicas:
    """Replicas behind a DNS name with one A record per ready replica (a Kubernetes headless Service).

    `slots` is the most replicas the proxy tracks; the name may contain HAProxy `${VAR}` references, expanded from
    the proxy's environment (the router Deployment sets POD_NAMESPACE)."""
    hostname: str
    slots: int
    grpc_port: int = DEFAULT_PORTS["grpc"]
    http_port: int = DEFAULT_PORTS["http"]


def render_proxy_config(replicas: LoopbackReplicas | DnsReplicas, *, bind_host: str, grpc_port: int, http_port: int,
                        check_interval_s: float = 1.0, stats_socket: str | Path | None = None) -> str:
    """The HAProxy configuration: a gRPC (HTTP/2 cleartext) and an HTTP front end, each hashing the session
    header consistently over the replicas that answer Triton's readiness check; one log line per request.

    A replica is out after 2 failed checks (`check_interval_s` apart; a refused connection fails at once, a check
    may take 3 s on a busy machine) and back after 1 success; a request that cannot connect is retried and
    redispatched to a live replica. Requests without the header are spread round
    robin (the fallback of `balance hdr`): fine for sequences of one request. Statistics requests go to the first
    healthy replica, so that a tool diffing two snapshots (perf_analyzer) reads one server's counters.
    """
    header = spec.SESSION_HEADER
    interval = f"{int(check_interval_s * 1000)}ms"
    lines = [
        "# Rendered by liveportrait_triton.cluster.render_proxy_config (HAProxy 2.6); do not edit by hand.",
        "global",
        "    log stdout format raw local0",
        *([f"    stats socket {stats_socket} mode 600 level operator"] if stats_socket else []),
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    timeout connect 2s",
        "    timeout check 3s",
        f"    timeout client {STREAM_IDLE_TIMEOUT_S}s     # an idle stream's sequence is freed by then",
        f"    timeout server {STREAM_IDLE_TIMEOUT_S}s",
        "    retries 3",
        "    option redispatch 1",
        f"    default-server inter {interval} fall 2 rise 1",
        "",
    ]
    if isinstance(replicas, DnsReplicas):
        lines += [
            "resolvers cluster",
            "    parse-resolv-conf",
            "    hold valid 5s",
            "    timeout resolve 1s",
            "    timeout retry 1s",
            "",
        ]
    statistics = {"grpc": "path /inference.GRPCInferenceService/ModelStatistics", "http": "path_end /stats"}
    for kind, bind_port in (("grpc", grpc_port), ("http", http_port)):
        lines += [
            f"frontend {kind}",
            f"    bind {bind_host}:{bind_port}" + (" proto h2" if kind == "grpc" else ""),
            f"    capture request header {header} len 64",
            f'    log-format "{kind} %s %ST %HPO %[capture.req.hdr(0)]"',
            # statistics are per replica: successive calls must see the same one (perf_analyzer diffs them)
            f"    use_backend {kind}_statistics if {{ {statistics[kind]} }}",
            f"    default_backend {kind}_replicas",
            "",
        ]
        for backend, balance in ((f"{kind}_replicas", [f"    balance hdr({header})", "    hash-type consistent"]),
                                 (f"{kind}_statistics", ["    balance first"])):
            lines += [f"backend {backend}", *balance, "    option httpchk",
                      f"    http-check send meth GET uri {HEALTH_PATH}", "    http-check expect status 200",
                      *_server_lines(replicas, kind), ""]
    return "\n".join(lines)


KUBERNETES_REPLICAS = DnsReplicas("liveportrait-triton.${POD_NAMESPACE}.svc.cluster.local", slots=8)
"""The Triton pods of deploy/k8s: the headless Service's A records; one slot per replica the HPA may run."""


def kubernetes_proxy_config() -> str:
    """The rendering held by deploy/k8s/router.yaml (ConfigMap liveportrait-router, key haproxy.cfg)."""
    return render_proxy_config(KUBERNETES_REPLICAS, bind_host="0.0.0.0", grpc_port=DEFAULT_PORTS["grpc"],
                               http_port=DEFAULT_PORTS["http"], check_interval_s=2.0)


def _server_lines(replicas: LoopbackReplicas | DnsReplicas, kind: str) -> list[str]:
    """The replicas of a `kind` ('grpc' or 'http') back end, each health-checked on its HTTP port."""
    # gRPC goes to the replicas over HTTP/2 cleartext; its check asks the HTTP/1 port (check-proto h1)
    proto = " proto h2 check-proto h1" if kind == "grpc" else ""
    if isinstance(replicas, DnsReplicas):
        port = replicas.grpc_port if kind == "grpc" else replicas.http_port
        return [f'    server-template replica {replicas.slots} "{replicas.hostname}:{port}"{proto} '
                f"check port {replicas.http_port} resolvers cluster resolve-prefer ipv4 init-addr none"]
    return [f"    server {name} {host}:{grpc if kind == 'grpc' else http}{proto} check port {http}"
            for name, (host, grpc, http) in replicas.addresses.items()]


def parse_proxy_log(text: str) -> list[dict[str, str]]:
    """The proxy's log lines (format of render_proxy_config) as dicts of LOG_FIELDS; other lines are skipped."""
    entries = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) == len(LOG_FIELDS) and parts[0] in ("grpc", "http"):
            entries.append(dict(zip(LOG_FIELDS, parts)))
    return entries


def find_proxy() -> Path:
    """The installed haproxy binary (Debian puts it in /usr/sbin, which a user's PATH may lack)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not found:
        raise ClusterError("HAProxy is not installed: `apt-get install haproxy` (scripts/install.sh does it)")
    return Path(found)


class LocalCluster:
    """`replicas` bundled Triton servers on loopback behind HAProxy, as a context manager.

    Clients use `grpc_url` (or `http_url`). The proxy's log (one line per request or gRPC stream: front end,
    replica, status, path, session) is `proxy_log()`; `replica_states()` reads which replicas pass their check.
    """

    def __init__(self, repository: str | Path, replicas: int, *, host: str = "127.0.0.1",
                 grpc_port: int | None = None, http_port: int | None = None, check_interval_s: float = 1.0,
                 log_dir: str | Path | None = None, admin_key: str | None = None, startup_timeout_s: float = 300.0):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.repository = Path(repository)
        self.host = host
        self.ports = {"grpc": grpc_port or free_port(host), "http": http_port or free_port(host)}
        self.check_interval_s = check_interval_s
        self._own_dir = None if log_dir else tempfile.mkdtemp(prefix="liveportrait-cluster-")
        self.log_dir = Path(log_dir or self._own_dir)
        self.replicas = {f"replica{i}": TritonServer(self.repository, admin_key=admin_key,
                                                       log_file=self.log_dir / f"replica{i}.log",
                                                       startup_timeout_s=startup_timeout_s)
                         for i in range(replicas)}
        self.config_file = self.log_dir / "haproxy.cfg"
        self.proxy_log_file = self.log_dir / "haproxy.log"
        self.stats_socket = self.log_dir / "haproxy.sock"
        self.proxy: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    def config(self) -> str:
        addresses = {name: (server.host, server.ports["grpc"], server.ports["http"])
                     for name, server in self.replicas.items()}
        return render_proxy_config(LoopbackReplicas(addresses), bind_host=self.host, grpc_port=self.ports["grpc"],
                                   http_port=self.ports["http"], check_interval_s=self.check_interval_s,
                                   stats_socket=self.stats_socket)

    def start(self) -> "LocalCluster":
        taken = [f"{kind} port {port}" for kind, port in self.ports.items() if not port_is_free(self.host, port)]
        if taken:
            raise ClusterError(f"{', '.join(taken)} already in use on {self.host}: choose other ports")
        binary = find_proxy()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for server in self.replicas.values():
                server.start()
            self.config_file.write_text(self.config())
            check = subprocess.run([str(binary), "-c", "-q", "-f", str(self.config_file)], capture_output=True,
                                   text=True)
            if check.returncode != 0:
                raise ClusterError(f"HAProxy refused {self.config_file}:\n{(check.stdout + check.stderr).strip()}")
            with open(self.proxy_log_file, "wb") as log:
                self.proxy = subprocess.Popen([str(binary), "-db", "-f", str(self.config_file)], stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True,
                                              preexec_fn=_terminate_with_parent if _on_main_thread() else None)
            self._wait_all_up(timeout_s=30 + 5 * self.check_interval_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_all_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states: dict = {}
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                raise ClusterError(f"HAProxy exited with status {self.proxy.returncode}:\n{self.proxy_log()[-2000:]}")
            try:
                states = self.replica_states()
            except OSError:         # the stats socket is not there yet
                states = {}
            if states and all(state == "UP" for state in states.values()):
                return
            time.sleep(0.2)
        raise ClusterError(f"not every replica passed HAProxy's health check within {timeout_s:g} s: {states}")

    def replica_states(self) -> dict[str, str]:
        """Replica -> its health as the proxy sees it ('UP', 'DOWN', ...), from the gRPC back end."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"].split(" ")[0] for row in rows
                if row["pxname"] == "grpc_replicas" and row["svname"] in self.replicas}

    def proxy_log(self) -> str:
        return self.proxy_log_file.read_text(errors="replace") if self.proxy_log_file.is_file() else ""

    def stop(self) -> None:
        """Stop the proxy, then every replica (each stops its whole process group); no orphans."""
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.terminate()
                try:
                    self.proxy.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proxy.kill()
                    self.proxy.wait()
            self.proxy = None
        for server in self.replicas.values():
            server.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def endpoints(self) -> str:
        lines = [f"GRPC    {self.grpc_url}    (clients use this; sessions hash on {spec.SESSION_HEADER})",
                 f"HTTP    http://{self.http_url}"]
        lines += [f"  {name}: gRPC {server.grpc_url}, metrics {server.metrics_url}"
                  for name, server in self.replicas.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, metavar="DIR", help="Triton model repository to serve")
    parser.add_argument("--replicas", type=int, default=2, metavar="N", help="Triton servers to start (default 2)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS["grpc"],
                        help="the proxy's gRPC port, the one address clients use")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"], help="the proxy's HTTP port")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="where the replicas' logs, the proxy's config and its log go (default: a temporary "
                             "directory, removed on stop)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for each replica's models to be ready")


def run(args) -> int:
    cluster = LocalCluster(args.repository, args.replicas, grpc_port=args.grpc_port, http_port=args.http_port,
                           log_dir=args.log_dir, startup_timeout_s=args.startup_timeout)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting {args.replicas} Triton replicas on {cluster.repository} and HAProxy "
              f"(logs: {cluster.log_dir}) ...", flush=True)
        try:
            cluster.start()
        except (ServerError, ClusterError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ready\n{cluster.endpoints()}\nCtrl-C to stop", flush=True)
        reported: set[str] = set()
        while not stop.wait(1.0):
            if cluster.proxy.poll() is not None:
                print(f"error: HAProxy exited unexpectedly:\n{cluster.proxy_log()[-2000:]}", file=sys.stderr)
                return 1
            for name, server in cluster.replicas.items():
                if name in reported:
                    continue
                dead = server.dead_stubs()
                if dead:            # Triton would stay "ready" and fail every request to that model: take it out
                    print(f"warning: the Python-backend process of {', '.join(dead)} on {name} died; stopping "
                          f"{name}", file=sys.stderr, flush=True)
                    server.stop()
                if not server.alive():
                    reported.add(name)
                    print(f"warning: {name} exited; the proxy sends its sessions to the other replicas",
                          file=sys.stderr, flush=True)
            if len(reported) == len(cluster.replicas):
                print("error: every replica has exited", file=sys.stderr)
                return 1
        print("stopping ...", flush=True)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
