"""Why ffmpeg children died under gRPC: fork a short-lived child many times while a gRPC channel is busy, with and
without `preexec_fn` (imageio-ffmpeg passes `preexec_fn=os.setpgrp`), and count children that die before exec.

    python -m liveportrait_triton.benchmarks.fork_exec_check --repository DIR [--children 300]

With `preexec_fn` CPython forks (instead of vfork/posix_spawn), so grpcio's pthread_atfork handler runs in the
child and restarts its epoll poller there; subprocess then closes the inherited descriptors before exec, the
poller's epoll_wait fails with EBADF and the child aborts (SIGABRT) before it becomes ffmpeg: the parent's next
write to its stdin is a broken pipe, and a reader finds no header ("Could not load meta information").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import threading

import tritonclient.grpc as grpcclient

from ..serve import TritonServer


def children_that_died(url: str, children: int, preexec: bool) -> int:
    stop = threading.Event()

    def busy() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while not stop.is_set():
                client.is_server_live()

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    died = 0
    try:
        for _ in range(children):
            extra = {"preexec_fn": os.setpgrp} if preexec else {"process_group": 0}
            child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **extra)
            try:
                child.stdin.write(b"x" * 100_000)
                child.stdin.close()
            except BrokenPipeError:
                pass
            if child.wait() != 0:
                died += 1
    finally:
        stop.set()
        thread.join()
    return died


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, help="a model repository to serve (tiny networks suffice)")
    parser.add_argument("--children", type=int, default=300)
    args = parser.parse_args(argv)
    with TritonServer(args.repository) as server:
        for preexec in (True, False):
            died = children_that_died(server.grpc_url, args.children, preexec)
            print(f"preexec_fn {'set' if preexec else 'unset'}: {died} of {args.children} children died before "
                  "exec", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
