"""Starting and stopping the bundled Triton server: clear errors, idle eviction, the CLI, no orphan processes."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import rendered_copy, serve_command, server_metric
from liveportrait_triton import spec
from liveportrait_triton.serve import ServerError, TritonServer, explain_log, free_port

pytestmark = pytest.mark.server

# Lines as Triton 2.51 writes them (from real failed starts).
PORT_LOG = ("E1127 03:55:36.935061 25477 main.cc:245] \"failed to start GRPC service: Unavailable - Socket "
            "'127.0.0.1:57493' already in use \"")
LOAD_LOG = ("E1127 04:00:28.277699 3476 model_lifecycle.cc:642] \"failed to load 'warping_module' version 1: "
            "Internal: ConfigError: model 'warping_module': /r/warping_module/1/model.onnx not found (run "
            "`liveportrait-triton export`)\\n\\nAt:\\n  /r/warping_module/1/model.py(17): initialize\\n\"")


def test_explain_log_names_ports_and_models():
    assert "GRPC port: 127.0.0.1:57493 is already in use" in explain_log(PORT_LOG)
    explained = explain_log(LOAD_LOG)
    assert explained == ("model 'warping_module' failed to load: Internal: ConfigError: model 'warping_module': "
                         "/r/warping_module/1/model.onnx not found (run `liveportrait-triton export`)")
    assert "last lines" in explain_log("I0000 all fine\nsomething else")


def test_a_taken_port_is_reported_before_starting(tiny_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"grpc port {port} already in use on 127.0.0.1"):
            TritonServer(tiny_repository, grpc_port=port).start()


def test_a_model_that_fails_to_load_is_named(tiny_repository, tmp_path):
    from liveportrait_triton import runtimes
    broken = rendered_copy(tiny_repository, tmp_path / "repository")
    served = runtimes.runtime_plan("local")[spec.WARPING].path(broken)
    served.unlink()                      # the file W's runtime kind serves (model.onnx or model.pt)
    server = TritonServer(broken, log_file=tmp_path / "triton.log")
    with pytest.raises(ServerError) as failed:
        server.start()
    message = str(failed.value)
    assert f"model '{spec.WARPING}' failed to load" in message and f"{served.name} not found" in message
    assert not server.alive()


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def crashed(pids: set[int]) -> list[str]:
    """Kernel log lines of segfaults of these processes (skips the check where the kernel log is not readable)."""
    result = subprocess.run(["dmesg"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("the kernel log (dmesg) is not readable here")
    return [line for line in result.stdout.splitlines()
            if "segfault" in line and any(f"[{pid}]" in line for pid in pids)]


def test_idle_sequences_are_evicted(tiny_repository, tmp_path, source_crops):
    """...and the stubs exit cleanly when the server stops (the pipeline's metrics used to crash its stub)."""
    repository = rendered_copy(tiny_repository, tmp_path / "repository", sequence_idle_timeout_s=2)
    with TritonServer(repository, log_file=tmp_path / "triton.log") as server:
        stubs = descendants(server.process.pid)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        source = grpcclient.InferInput("source", [1, 256, 256, 3], "UINT8")
        source.set_data_from_numpy(source_crops["s0"][None])
        client.infer(spec.PIPELINE, [source], sequence_id=9, sequence_start=True)
        assert server_metric(server, "liveportrait_live_sequences") == 1
        deadline = time.monotonic() + 30
        while server_metric(server, "liveportrait_live_sequences") and time.monotonic() < deadline:
            time.sleep(0.25)
        assert server_metric(server, "liveportrait_live_sequences") == 0
        assert server_metric(server, "liveportrait_sequence_state_bytes") == 0
        assert server_metric(server, "liveportrait_sequences_freed_total", reason="idle") == 1
        driving = grpcclient.InferInput("driving", [1, 256, 256, 3], "UINT8")
        driving.set_data_from_numpy(source_crops["s1"][None])
        with pytest.raises(InferenceServerException, match="sequence 9") as late:
            client.infer(spec.PIPELINE, [driving], sequence_id=9)
        assert "INVALID_ARGUMENT" in str(late.value.status())
    time.sleep(1)
    assert not crashed(stubs), "a Python-backend stub crashed while the server stopped"


def test_cli_serves_until_interrupted_and_leaves_no_process(tiny_repository):
    command, ports = serve_command(tiny_repository)
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(line.startswith("Ctrl-C") for line in lines):
            line = cli.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        output = "\n".join(lines)
        assert f"GRPC    127.0.0.1:{ports[1]}" in output and f"http://127.0.0.1:{ports[0]}" in output, output
        assert spec.PIPELINE in output
        assert grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}").is_server_ready()
        processes = descendants(cli.pid)
        assert len(processes) >= 1 + len(spec.SUBMODELS) + 1, "server and one stub per model"
        log = Path(re.search(r"\(log: (\S+)\)", output).group(1))
        assert log.is_file(), output
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=120) == 0
        leftovers = [p for p in processes if running(p)]
        assert not leftovers, f"processes left running: {leftovers}"
        assert not log.parent.exists(), f"a clean stop removes its temporary log folder {log.parent}"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_a_killed_client_takes_its_server_down(tiny_repository):
    """SIGKILL (e.g. the OOM killer) on the process that started a server: the server and its stubs stop too."""
    code = ("import sys, time\nfrom liveportrait_triton.serve import TritonServer\n"
            "server = TritonServer(sys.argv[1]).start()\nprint(server.process.pid, flush=True)\ntime.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", code, str(tiny_repository)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(client.stdout.readline())
        processes = {server_pid} | descendants(server_pid)
        assert len(processes) >= 2 + len(spec.SUBMODELS)
    finally:
        client.kill()
        client.wait()
    deadline = time.monotonic() + 60
    while any(running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not [p for p in processes if running(p)], "server or stubs outlived the killed client"


def test_free_ports_are_never_handed_out_twice():
    """A server's three ports (and a cluster's) are chosen one after another: each must differ from every other."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
