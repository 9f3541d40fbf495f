#!/usr/bin/env python3
"""Container health check: exit 0 when Triton answers 200 on its HTTP health endpoint, else 1 (with the reason).

`ready` (default): every model is loaded (Triton runs with --strict-readiness). `live`: the server process serves.
Used by the image's HEALTHCHECK and docker/compose.yaml; Kubernetes probes the same paths with httpGet.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from liveportrait_triton.serve import DEFAULT_PORTS

HEALTH_PATHS = {"ready": "/v2/health/ready", "live": "/v2/health/live"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", nargs="?", choices=sorted(HEALTH_PATHS), default="ready")
    parser.add_argument("--port", type=int, default=DEFAULT_PORTS["http"], help="Triton HTTP port (default %(default)s)")
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}{HEALTH_PATHS[args.probe]}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
