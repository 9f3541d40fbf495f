"""Checks of a model's parsed config.pbtxt against the tensor spec (run in `initialize`)."""
from __future__ import annotations

from .. import spec


class ConfigError(ValueError):
    """A model configuration (or artefact) that does not match the tensor spec: the model must not load."""


def config_parameter(model_config: dict, key: str, default: str | None = None) -> str:
    """A string parameter of a parsed config.pbtxt (Triton's JSON form); ConfigError when missing and no default."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    if value is None:
        if default is None:
            raise ConfigError(f"model {model_config.get('name')!r}: config.pbtxt has no parameter {key!r}")
        return default
    return value


def config_parameters(model_config: dict) -> dict[str, str]:
    """Every string parameter of a parsed config.pbtxt (Triton's JSON form)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def check_model_config(model_config: dict, model_spec: spec.ModelSpec) -> None:
    """The config's inputs and outputs must be the spec's: same names, data types, dims and optional flags."""
    name = model_config.get("name")
    if name != model_spec.name:
        raise ConfigError(f"config.pbtxt names model {name!r}, expected {model_spec.name!r}")
    if int(model_config.get("max_batch_size", 0)) < 1:
        raise ConfigError(f"model {name!r}: max_batch_size must be >= 1 (requests are batched)")
    for kind, tensors in (("input", model_spec.inputs), ("output", model_spec.outputs)):
        got = {t["name"]: t for t in model_config.get(kind, [])}
        want = {t.name: t for t in tensors}
        if set(got) != set(want):
            raise ConfigError(f"model {name!r}: config {kind}s {sorted(got)} differ from the spec's {sorted(want)}")
        for tname, t in want.items():
            entry = got[tname]
            dims = tuple(int(d) for d in entry.get("dims", []))
            if entry.get("data_type") != t.triton_type or dims != t.shape:
                raise ConfigError(f"model {name!r} {kind} {tname!r}: config has {entry.get('data_type')} "
                                  f"{list(dims)}, the spec says {t.triton_type} {list(t.shape)}")
            if kind == "input" and bool(entry.get("optional", False)) != t.optional:
                raise ConfigError(f"model {name!r} input {tname!r}: optional flag differs from the spec")
