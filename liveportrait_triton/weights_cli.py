"""`liveportrait-triton weights --synthetic SEED --out DIR [--config tiny|full]`."""
from __future__ import annotations

import argparse

from .config import CONFIGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", type=int, required=True, metavar="SEED",
                        help="write deterministic synthetic weights from this seed (not a trained model)")
    parser.add_argument("--out", required=True, help="output directory (official layout)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")


def run(args) -> int:
    from .weights import write_synthetic_weights
    for path in write_synthetic_weights(args.out, args.synthetic, args.config):
        print(f"wrote {path}")
    return 0
