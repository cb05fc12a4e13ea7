"""Flat state dicts: the form of an optimizer's ``state_dict()`` that ``np.savez`` can store.

``np.savez(path, **flatten_state_dict(opt.state_dict()))`` writes it and
``opt.load_state_dict(np.load(path))`` reads it back, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

_HYPERPARAMETERS_KEY = "param_groups.json"
# The dtypes np.asarray gives Python scalars (step counts, scalar states such as mu_product): a 0-d
# array of one of them is read back as that scalar. A 0-d state of another dtype (the exp_avg of a
# 0-d float32, float16 or bfloat16 param; np.load gives bfloat16 back as raw 'V2', whose .item()
# is bytes) stays an array, which load_state_dict reads with its dtype.
_PYTHON_SCALAR_DTYPES = frozenset(np.asarray(value).dtype for value in (False, 0, 0.0))


def param_id_of(text: str) -> int | None:
    """The param id a string names: its decimal digits as str() writes an int ("7"; not " 7",
    "07" or "0_7", which int() reads as 7 too, so that two keys could name one param), else
    None."""
    if text.isascii() and text.isdigit() and str(int(text)) == text:
        return int(text)
    return None


def flatten_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Turn a nested state dict into ``{"state/<index>/<name>": array, ...}`` plus the param
    groups as JSON, every value a NumPy array (steps included), so ``np.savez`` keeps it exactly."""
    flat: dict[str, np.ndarray] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            flat[f"state/{index}/{name}"] = np.asarray(value)
    flat[_HYPERPARAMETERS_KEY] = np.array(json.dumps(state_dict["param_groups"]))
    return flat


def unflatten_state_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_state_dict`; a nested dict is returned unchanged."""
    if not isinstance(flat, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(flat).__name__}")
    if "state" in flat and "param_groups" in flat:
        return dict(flat)
    if _HYPERPARAMETERS_KEY not in flat:
        raise ValueError(
            "state_dict: expected a dict with 'state' and 'param_groups', or the flat form "
            "made by fusedopt.flatten_state_dict"
        )
    state: dict[int, dict[str, Any]] = {}
    for key in flat:
        if key == _HYPERPARAMETERS_KEY:
            continue
        if not isinstance(key, str):
            raise TypeError(f"state_dict: keys of a flat state dict are strings, got {key!r}")
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] != "state":
            raise ValueError(f"state_dict: unexpected key {key!r}")
        prefix, index, name = parts
        param_id = param_id_of(index)
        if param_id is None:
            raise ValueError(f"state_dict: unexpected key {key!r} (not a param index)")
        value = np.asarray(flat[key])
        if value.ndim == 0 and value.dtype in _PYTHON_SCALAR_DTYPES:
            value = value.item()
        state.setdefault(param_id, {})[name] = value
    try:
        groups = json.loads(str(np.asarray(flat[_HYPERPARAMETERS_KEY])))
    except ValueError:
        raise ValueError(f"state_dict: {_HYPERPARAMETERS_KEY} is not valid JSON") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError(f"state_dict: {_HYPERPARAMETERS_KEY} must hold a list of param groups")
    for group in groups:
        for key, value in group.items():
            if isinstance(value, list) and key != "params":
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}
