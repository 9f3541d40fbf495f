"""Write tests/data/parity_seed0_s0_d30.npz and parity_animals_seed3_s39_wink.npz, the compact copies of the
official parity vectors (humans; Animals mode) the tests ship with.

    .venv/bin/python tests/make_compact_reference.py [--shared ../shared]

Arrays of at most WHOLE_LIMIT values are copied whole (the 256x256 inputs are kept as the uint8 images their
float tensors were made from: `*_tensor` equals `*_rgb256_uint8 / 255` exactly, checked here). Larger tensors
(the feature volume, W's outputs, the dense-motion mask, G's image) keep:
- `<name>.index`: SAMPLES flat indices drawn with a fixed seed, `<name>.value`: the tensor there;
- `<name>.channel_mean`, `<name>.channel_std`: statistics over every axis but the channel axis (axis 1);
- `<name>.shape`.
tests/reference_data.py reads it back; tests/test_parity.py shows that planted implementation mistakes fail on
it as they do on the full vectors.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# shared/reference/public/<name> -> tests/data/<compact name>
FILES = {"ref_seed0_s0_d30.npz": "parity_seed0_s0_d30.npz",
         "ref_animals_seed3_s39_wink.npz": "parity_animals_seed3_s39_wink.npz"}
WHOLE_LIMIT = 5000
SAMPLES = 8192
SEED = 20240531
IMAGES = ("source", "driving", "driving0")


def compact(reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(SEED)
    for name in sorted(reference):
        value = reference[name]
        if name.endswith("_tensor") and name[:-len("_tensor")] in IMAGES:
            image = reference[name.replace("_tensor", "_rgb256_uint8")]
            rebuilt = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
            if not np.array_equal(rebuilt, value):
                raise SystemExit(f"{name} is not {name.replace('_tensor', '_rgb256_uint8')} / 255: store it whole")
            continue                    # rebuilt from the uint8 image by the reader
        if name.endswith("_rgb256_uint8") or value.size <= WHOLE_LIMIT or value.dtype.kind not in "fu":
            out[name] = value
            continue
        flat = value.reshape(-1)
        index = np.sort(rng.choice(flat.size, size=SAMPLES, replace=False)).astype(np.int64)
        axes = tuple(a for a in range(value.ndim) if a != 1)
        as64 = value.astype(np.float64)
        out[f"{name}.shape"] = np.asarray(value.shape, np.int64)
        out[f"{name}.index"] = index
        out[f"{name}.value"] = flat[index]
        out[f"{name}.channel_mean"] = as64.mean(axis=axes)
        out[f"{name}.channel_std"] = as64.std(axis=axes)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared/ folder")
    args = parser.parse_args(argv)
    for name, compact_name in FILES.items():
        source = args.shared / "reference" / "public" / name
        reference = dict(np.load(source))
        out = compact(reference)
        meta = json.loads(str(reference["meta_json"])) if "meta_json" in reference else {}
        out["compact_json"] = np.asarray(json.dumps({"from": f"shared/reference/public/{name}", "samples": SAMPLES,
                                                     "seed": SEED, "whole_limit": WHOLE_LIMIT,
                                                     "official_commit": meta.get("official_commit", "")}))
        path = REPO / "tests" / "data" / compact_name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **out)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(out)} arrays) from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
