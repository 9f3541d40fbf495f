"""Security defaults of `liveportrait-triton serve` (TritonServer) on the real server, filling the gaps of
tests/test_server.py (HTTP repository index needs the key; startup log names 127.0.0.1) and
tests/test_deploy_server.py (the ngc command: HTTP 403 without the key, unload refused with it).

Checked here: model control is off over both protocols (load/unload refused, with or without the key); every
restricted API (model-repository, shared-memory, logging, trace) refuses a request without the key or with a wrong
one and serves it with the key, over HTTP and gRPC, while health, metadata, config and inference stay open;
the server listens on 127.0.0.1 only (its sockets in /proc/net, a connection to 127.0.0.2 refused); request size:
Triton 2.51 has no request-size flag, so a large request is read whole and then refused by the exact-shape checks.

Motion templates and weights never unpickle arbitrary objects: tests/test_templates.py
(test_malicious_pickle_is_refused_without_running, test_other_globals_and_object_arrays_are_refused) and
tests/test_weights.py (test_checkpoint_that_would_run_code_is_refused).
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from liveportrait_triton import serve, spec

pytestmark = pytest.mark.server

MODEL = spec.PIPELINE
HTTP_REFUSED = "This API is restricted, expecting header 'lp-admin-key'"
GRPC_REFUSED = f"This protocol is restricted, expecting header '{serve.GRPC_ADMIN_HEADER}'"

# one call of each restricted API, as the tritonclient method name and its arguments
RESTRICTED_CALLS = {
    "model-repository": ("get_model_repository_index", ()),
    "shared-memory": ("get_system_shared_memory_status", ()),
    "logging": ("get_log_settings", ()),
    "trace": ("get_trace_settings", ()),
}


@pytest.fixture(scope="module")
def clients(tiny_server):
    made = {"http": httpclient.InferenceServerClient(tiny_server.http_url),
            "grpc": grpcclient.InferenceServerClient(tiny_server.grpc_url)}
    yield made
    for client in made.values():
        client.close()


def key_header(protocol: str, key: str) -> dict:
    return {serve.ADMIN_HEADER if protocol == "http" else serve.GRPC_ADMIN_HEADER: key}


def refused_message(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return str(refused.value.status()), refused.value.message()


def assert_restricted(protocol: str, status: str, message: str) -> None:
    """Triton 2.51 answers a restricted HTTP API with 403 and a restricted gRPC protocol with UNAVAILABLE."""
    if protocol == "http":
        assert status == "403" and HTTP_REFUSED in message, (status, message)
    else:
        assert status == "StatusCode.UNAVAILABLE" and GRPC_REFUSED in message, (status, message)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("api", RESTRICTED_CALLS)
def test_restricted_api_needs_the_admin_key(api, protocol, clients, tiny_server):
    client = clients[protocol]
    method, args = RESTRICTED_CALLS[api]
    call = getattr(client, method)
    assert_restricted(protocol, *refused_message(lambda: call(*args)))
    assert_restricted(protocol, *refused_message(lambda: call(*args, headers=key_header(protocol, "guess"))))
    # the HTTP header name does not open the gRPC protocols (Triton prefixes it there)
    wrong_name = {serve.ADMIN_HEADER: tiny_server.admin_key} if protocol == "grpc" else None
    if wrong_name:
        assert_restricted(protocol, *refused_message(lambda: call(*args, headers=wrong_name)))
    answer = call(*args, headers=key_header(protocol, tiny_server.admin_key))
    assert answer is not None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_models_cannot_be_loaded_or_unloaded(protocol, clients, tiny_server):
    """Models load at start only (--model-control-mode=none): load/unload are refused without the key (restricted
    model-repository API) and with it (Triton 2.51 then says explicit load/unload is not allowed)."""
    client = clients[protocol]
    for action in (client.unload_model, client.load_model):
        assert_restricted(protocol, *refused_message(lambda: action(spec.STITCHING)))
        status, message = refused_message(lambda: action(spec.STITCHING,
                                                         headers=key_header(protocol, tiny_server.admin_key)))
        assert "explicit model load / unload is not allowed" in message, (status, message)
    assert client.is_model_ready(spec.STITCHING) and client.is_server_ready()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_metadata_config_and_inference_stay_open(protocol, clients):
    """What a client needs works without any key."""
    client = clients[protocol]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata()
    assert client.get_model_metadata(MODEL) and client.get_model_config(MODEL)
    module = httpclient if protocol == "http" else grpcclient
    inputs = [module.InferInput("kp_source", [1, 21, 3], "FP32"), module.InferInput("kp_driving", [1, 21, 3], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.zeros((1, 21, 3), np.float32))
    assert client.infer(spec.STITCHING, inputs).as_numpy("delta").shape == (1, 65)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by the process, from /proc/<pid>/fd and /proc/net."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:       # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # /proc/net shows the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(socket.inet_ntop(family, raw))
            found.append((str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16)))   # gRPC: ::ffff:127.0.0.1
    return found


def test_server_listens_on_loopback_only(tiny_server):
    processes = [tiny_server.process.pid, *tiny_server.stub_processes().values()]
    sockets = sorted(s for pid in processes for s in listening_sockets(pid))
    assert sockets == sorted(("127.0.0.1", port) for port in tiny_server.ports.values()), sockets
    for port in tiny_server.ports.values():
        with socket.socket() as other:          # 127.0.0.2 is this machine too, but not the bound address
            other.settimeout(5)
            assert other.connect_ex(("127.0.0.2", port)) == errno.ECONNREFUSED
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert parser.parse_args(["--repository", "r"]).host == "127.0.0.1", "the serve command defaults to loopback"


def test_large_requests_are_read_then_refused_by_the_exact_shapes(clients, tiny_server):
    """Triton 2.51 has no request-size flag (--http-max-input-size came later; the container entrypoint adds it
    where the server has it): a 48 MiB tensor is received whole and refused by the shape check, over both
    protocols, and the server goes on."""
    install = serve.find_triton()
    shown = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True,
                           env=tiny_server.environment(install), timeout=60)
    assert "--http-restricted-api" in shown.stdout + shown.stderr
    assert "--http-max-input-size" not in shown.stdout + shown.stderr
    big = np.zeros((1, 4096, 4096, 3), np.uint8)
    for protocol, module in (("http", httpclient), ("grpc", grpcclient)):
        tensor = module.InferInput("source", list(big.shape), "UINT8")
        tensor.set_data_from_numpy(big)
        status, message = refused_message(lambda: clients[protocol].infer(
            MODEL, [tensor], sequence_id=4242, sequence_start=True, sequence_end=True))
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, message)
        assert "Expected [-1,256,256,3], got [1,4096,4096,3]" in message
        assert clients[protocol].is_server_ready()
