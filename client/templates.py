"""Motion templates: per-frame head pose and expression that drive the pipeline without a driving video.

Two formats are read:
- the official `.pkl` (a pickled dict: n_frames, output_fps, motion = [{scale (1,1), R (1,3,3), exp (1,21,3),
  t (1,3), ...}], optionally c_eyes_lst / c_lip_lst). Pickle can run code while loading, so it is read with an
  unpickler that resolves nothing but numpy's array/dtype/scalar reconstructors; everything else is refused
  before it is created.
- the project's own `.npz` (no pickle, `allow_pickle=False`): arrays R (n,3,3), exp (n,21,3), t (n,3),
  scale (n,1), fps (), format (), and optionally eye_ratio (n,2), lip_ratio (n,1).
"""
from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np

from ..config import NUM_KP
from ..wire import MotionFrame
from .media import atomic_output

NPZ_FORMAT = "liveportrait-triton-template/1"


class TemplateError(ValueError):
    """A template file that cannot be used (unsafe, malformed or unreadable)."""


@dataclasses.dataclass
class MotionTemplate:
    """A whole template in memory (templates are small: about 100 floats per frame)."""
    fps: float
    R: np.ndarray                       # (n, 3, 3)
    exp: np.ndarray                     # (n, 21, 3)
    t: np.ndarray                       # (n, 3)
    scale: np.ndarray                   # (n, 1)
    eye_ratio: np.ndarray | None = None     # (n, 2) driving eye-opening ratios, when recorded
    lip_ratio: np.ndarray | None = None     # (n, 1)

    def __post_init__(self):
        n = len(self.R)
        shapes = {"R": (3, 3), "exp": (NUM_KP, 3), "t": (3,), "scale": (1,), "eye_ratio": (2,), "lip_ratio": (1,)}
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float32)
            if arr.size != n * int(np.prod(shape)):
                raise TemplateError(f"template field {name!r}: expected {n} frames of shape {list(shape)}, "
                                    f"got {arr.size} values")
            if not np.all(np.isfinite(arr)):
                raise TemplateError(f"template field {name!r} contains NaN or Inf")
            setattr(self, name, arr.reshape((n,) + shape))
        if n == 0:
            raise TemplateError("template has no frames")
        if not np.isfinite(self.fps) or self.fps <= 0:
            raise TemplateError(f"template fps must be positive, got {self.fps!r}")
        self.fps = float(self.fps)

    def __len__(self) -> int:
        return len(self.R)

    def frame(self, i: int) -> MotionFrame:
        return MotionFrame(R=self.R[i], exp=self.exp[i], t=self.t[i], scale=self.scale[i])

    def ratios(self, i: int) -> tuple[float | None, float | None]:
        """(driving eye ratio, driving lip ratio) of frame i; the official rule uses the first eye's value."""
        eye = None if self.eye_ratio is None else float(self.eye_ratio[i, 0])
        lip = None if self.lip_ratio is None else float(self.lip_ratio[i, 0])
        return eye, lip


# ---------------------------------------------------------------------------------------------------------------
# Official .pkl templates


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """The one use protocol-2 pickles make of `_codecs.encode`; any other encoding is refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise TemplateError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only names a template pickle may reference: numpy's array, dtype and scalar reconstruction."""
    from numpy._core import multiarray
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        from numpy._core import numeric
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("_codecs", "encode")] = _latin1_bytes          # protocol-2 pickles store array bytes as latin-1 text
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and plain containers; refuses any other global."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise TemplateError(f"refusing to load {module}.{name}: a template may only contain numpy arrays "
                                f"and plain containers (this file would run code or build other objects)") from None

    def persistent_load(self, pid):
        raise TemplateError("refusing a pickle with persistent references")


def safe_unpickle(data: bytes):
    """Load pickle bytes with SafeUnpickler; object arrays are refused too."""
    try:
        value = SafeUnpickler(io.BytesIO(data)).load()
    except TemplateError:
        raise
    except Exception as exc:        # truncated or corrupt files raise many different exception types
        raise TemplateError(f"not a readable pickle: {type(exc).__name__}: {exc}") from exc
    _refuse_object_arrays(value)
    return value


def _refuse_object_arrays(value) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise TemplateError("refusing an object array in a template (only numeric arrays are allowed)")
    if isinstance(value, dict):
        for v in value.values():
            _refuse_object_arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _refuse_object_arrays(v)


def template_from_official(data: dict) -> MotionTemplate:
    """Convert the official template dict."""
    if not isinstance(data, dict) or "motion" not in data:
        raise TemplateError("not an official motion template: expected a dict with a 'motion' list")
    motion = data["motion"]
    if not isinstance(motion, (list, tuple)) or not motion:
        raise TemplateError("template 'motion' must be a non-empty list of per-frame dicts")
    fields = {}
    for key in ("R", "exp", "t", "scale"):
        try:
            fields[key] = np.stack([np.asarray(m[key], dtype=np.float32).reshape(-1) for m in motion])
        except (KeyError, TypeError) as exc:
            raise TemplateError(f"template motion frames must hold R, exp, t and scale ({exc!r})") from None
        except ValueError as exc:
            raise TemplateError(f"template motion {key!r} has inconsistent shapes: {exc}") from None
    n_frames = data.get("n_frames", len(motion))
    if n_frames != len(motion):
        raise TemplateError(f"template says n_frames={n_frames} but holds {len(motion)} motion frames")
    ratios = {}
    for key, name in (("c_eyes_lst", "eye_ratio"), ("c_lip_lst", "lip_ratio")):
        if data.get(key) is not None and len(data[key]):
            ratios[name] = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in data[key]])
    fps = data.get("output_fps", 25)
    return MotionTemplate(fps=float(fps), **fields, **ratios)


# ---------------------------------------------------------------------------------------------------------------
# The project's .npz templates


def save_npz(template: MotionTemplate, path: str | Path) -> Path:
    """Write a template atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    arrays = {"format": np.array(NPZ_FORMAT), "fps": np.float64(template.fps), "R": template.R,
              "exp": template.exp, "t": template.t, "scale": template.scale}
    if template.eye_ratio is not None:
        arrays["eye_ratio"] = template.eye_ratio
    if template.lip_ratio is not None:
        arrays["lip_ratio"] = template.lip_ratio
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_npz(path: str | Path) -> MotionTemplate:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:       # object arrays need pickle: refused
        raise TemplateError(f"{path}: not a plain-array .npz template ({exc})") from None
    except (OSError, EOFError) as exc:
        raise TemplateError(f"{path}: not a readable .npz file ({exc})") from None
    if str(arrays.get("format", "")) != NPZ_FORMAT:
        raise TemplateError(f"{path}: not a template .npz (format tag {NPZ_FORMAT!r} missing)")
    missing = [k for k in ("fps", "R", "exp", "t", "scale") if k not in arrays]
    if missing:
        raise TemplateError(f"{path}: template lacks {missing}")
    return MotionTemplate(fps=float(arrays["fps"]), R=arrays["R"], exp=arrays["exp"], t=arrays["t"],
                          scale=arrays["scale"], eye_ratio=arrays.get("eye_ratio"), lip_ratio=arrays.get("lip_ratio"))


TEMPLATE_SUFFIXES = (".pkl", ".npz")


def is_template(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TEMPLATE_SUFFIXES


def load_template(path: str | Path) -> MotionTemplate:
    """Read an official `.pkl` (safely) or a project `.npz` template."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"template {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".pkl":
        try:
            return template_from_official(safe_unpickle(path.read_bytes()))
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}") from None
    raise TemplateError(f"{path}: unknown template type {suffix!r} (expected .pkl or .npz)")
