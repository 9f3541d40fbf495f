"""`liveportrait-triton weights --synthetic SEED --out DIR [--config tiny|full] [--subject humans|animals]`."""
from __future__ import annotations

import argparse

from .config import CONFIGS
from .weights import ANIMAL_SUBJECTS, HUMAN_SUBJECTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthetic", type=int, required=True, metavar="SEED",
                        help="write deterministic synthetic weights from this seed (not a trained model)")
    parser.add_argument("--out", required=True, help="output directory (official layout)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--subject", choices=(*HUMAN_SUBJECTS, *ANIMAL_SUBJECTS), default="humans",
                        help="humans: the official layout (base_models/, retargeting_models/); animals: the "
                             "official Animals layout (base_models_v1.1/; stitching comes from the humans' weights)")


def run(args) -> int:
    from .weights import write_synthetic_weights
    for path in write_synthetic_weights(args.out, args.synthetic, args.config, args.subject):
        print(f"wrote {path}")
    return 0
