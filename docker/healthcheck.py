#!/usr/bin/env python3
"""Container health check: exit 0 when the server can serve, else 1 with the reasons (liveportrait_triton.health).

`ready` (default): every model is loaded (Triton runs with --strict-readiness) and every Python-backend stub runs.
`live`: the server process serves and no stub of a loaded model has died. Triton itself keeps answering 200 on its
health endpoints after a stub died, so the stub rule is what takes a broken replica out. Used by the image's
HEALTHCHECK, docker/compose.yaml and the Kubernetes probes (deploy/k8s/triton.yaml, exec probes).
"""
from __future__ import annotations

import argparse
import sys

from liveportrait_triton.health import PROBE_PATHS, problems
from liveportrait_triton.serve import DEFAULT_PORTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", nargs="?", choices=sorted(PROBE_PATHS), default="ready")
    parser.add_argument("--port", type=int, default=DEFAULT_PORTS["http"], help="Triton HTTP port (default %(default)s)")
    args = parser.parse_args(argv)
    found = problems(args.port, args.probe)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
