"""Node definitions as data, so one definition serves both ComfyUI node APIs (V3 and V1).

A node is its inputs (in widget order: workflows store widget values positionally), outputs and a
plain `run` function; `nodes/v3.py` and `nodes/v1.py` turn specs into ComfyUI classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # a widget kind above, or a link type ("IMAGE", "FLIPBOOK_LIGHTNING")
    tooltip: str
    options: Mapping[str, Any] = field(default_factory=dict)  # default/min/max/step/round/multiline/...
    choices: Optional[Callable[[], list[str]]] = None  # COMBO values, computed when ComfyUI asks
    optional: bool = False


@dataclass(frozen=True)
class NodeResult:
    outputs: tuple = ()
    ui: Optional[dict] = None


@dataclass(frozen=True)
class NodeSpec:
    node_id: str  # frozen forever once a workflow uses it
    display_name: str
    category: str
    description: str
    inputs: tuple[Param, ...]
    outputs: tuple[tuple[str, str], ...]  # (type, name)
    run: Callable[..., NodeResult]
    output_tooltips: tuple[str, ...] = ()  # one per output, shown on hover
    hidden: tuple[str, ...] = ()  # "prompt", "extra_pnginfo"
    output_node: bool = False
    needs_video_api: bool = False  # only offered where ComfyUI has its native VIDEO type (V3 API)
    # validate(cls, <widget>=None, ...) -> True | message: checked when the prompt is queued, before any
    # node runs. Named parameters only: ComfyUI skips its own min/max checks for a **kwargs validator.
    validate: Optional[Callable[..., Any]] = None
    # fingerprint(cls, <input>=None, ...) -> value: the node re-runs when it changes (e.g. a file's mtime)
    fingerprint: Optional[Callable[..., Any]] = None


def number_problem(name: str, value: Any, low: float, high: float, hint: str = "") -> Optional[str]:
    """Why a queued number is unusable (not a number, NaN/inf, out of range), or None. Node validators
    repeat these checks because ComfyUI skips its own for inputs a validator names, and NaN passes
    every min/max comparison."""
    if value is None:  # linked: checked when the node runs
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r} is not a number; use {low}-{high}{hint}"
    if not (math.isfinite(value) and low <= value <= high):
        return f"{name}={value} must be a finite number from {low} to {high}{hint}"
    return None


def option(spec: "NodeSpec", name: str, key: str) -> Any:
    """A Param's option (min, max, default...) by input name, so validators use the widget's own range."""
    return next(p.options[key] for p in spec.inputs if p.name == name)
