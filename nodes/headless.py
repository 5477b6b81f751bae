"""Run a UI-format workflow (version 0.4, as the frontend saves it) through our node classes, no server.

The conversion mirrors the frontend's graphToPrompt: widget values are assigned to inputs in
INPUT_TYPES order, the `control_after_generate` value that follows a seed is skipped, links become
[node_id, slot] references. The result is also the API `prompt` embedded in saved files.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
from typing import Any, Mapping

from ..core.errors import WorkflowError

log = logging.getLogger(__name__)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes, never sent to the server
# core nodes that only show an image in the browser: a headless run has no browser, so they are left out (logged)
DISPLAY_ONLY = {"PreviewImage"}
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"


def _is_widget(spec: tuple) -> bool:
    return isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES


def _has_control_widget(name: str, spec: tuple) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def _ordered_inputs(node_class) -> list[tuple[str, tuple]]:
    types = node_class.INPUT_TYPES()
    return [*types.get("required", {}).items(), *types.get("optional", {}).items()]


def _source(link: list, nodes: Mapping[int, Mapping[str, Any]], links: Mapping[int, list]) -> list:
    """Follow Reroute nodes back to the real origin of a link, as graphToPrompt does."""
    seen = set()
    while nodes.get(link[1], {}).get("type") == REROUTE and link[0] not in seen:
        seen.add(link[0])
        upstream = [i.get("link") for i in nodes[link[1]].get("inputs", []) if i.get("link") is not None]
        if not upstream or upstream[0] not in links:
            raise WorkflowError(f"Reroute node {link[1]} is not connected to anything.")
        link = links[upstream[0]]
    return link


def _node_inputs(node: Mapping[str, Any], node_class, links: Mapping[int, list],
                 nodes: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
    # a widget fed by a PrimitiveNode keeps the primitive's value in its own widgets_values
    linked = {name: link for name, link in linked.items()
              if link not in links or nodes.get(links[link][1], {}).get("type") != PRIMITIVE}
    values = list(node.get("widgets_values") or [])
    inputs: dict[str, Any] = {}
    for name, spec in _ordered_inputs(node_class):
        if _is_widget(spec) and values:
            value = values.pop(0)  # a widget converted to an input still keeps its slot in widgets_values
            if name not in linked:
                inputs[name] = value
            if _has_control_widget(name, spec) and values:
                values.pop(0)
        if name in linked:
            link = links.get(linked[name])
            if link is None:
                raise WorkflowError(f"Node {node['id']} input {name!r} refers to missing link {linked[name]}.")
            link = _source(link, nodes, links)
            inputs[name] = [str(link[1]), int(link[2])]
    return inputs


def _check_shape(workflow: Any) -> None:
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError("This JSON is not a UI workflow (no 'nodes' list). Save it from ComfyUI with "
                            "Workflow > Save, or pass an API-format prompt.")
    if any(not isinstance(link, list) for link in workflow.get("links", [])):
        raise WorkflowError("This workflow uses the version-1 link format; open it in ComfyUI and save it again.")


def _needed(prompt: Mapping[str, dict], mappings: Mapping[str, type]) -> dict[str, dict]:
    """Only the nodes that feed an output node run, as in ComfyUI's queue."""
    wanted = [k for k, v in prompt.items() if getattr(mappings[v["class_type"]], "OUTPUT_NODE", False)]
    if not wanted:
        raise WorkflowError("The workflow has no output node (e.g. Flipbook Save Video), so nothing would be saved.")
    keep: set[str] = set()
    while wanted:
        node_id = wanted.pop()
        if node_id in keep or node_id not in prompt:
            continue
        keep.add(node_id)
        wanted += [v[0] for v in prompt[node_id]["inputs"].values() if _is_link(v)]
    return {k: v for k, v in prompt.items() if k in keep}


def workflow_to_prompt(workflow: Mapping[str, Any], mappings: Mapping[str, type]) -> dict[str, dict]:
    """UI workflow -> API prompt {id: {class_type, inputs, _meta}} for the nodes that run."""
    _check_shape(workflow)
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in (*UI_ONLY, REROUTE, PRIMITIVE):
            continue
        if node["type"] in DISPLAY_ONLY and node["type"] not in mappings:
            log.info("node %s (%s) only displays in the browser; left out of the headless run", node["id"],
                     node["type"])
            continue
        node_class = mappings.get(node["type"])
        if node_class is None:
            raise WorkflowError(
                f"Node {node['id']} has type {node['type']!r}, which headless runs do not know. "
                f"Known: {', '.join(sorted(mappings))}."
            )
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": _node_inputs(node, node_class, links, nodes),
            "_meta": {"title": node.get("title") or node["type"]},
        }
    return _needed(prompt, mappings)


def apply_overrides(prompt: dict[str, dict], overrides: list[str], mappings: Mapping[str, type]) -> None:
    """`node.input=value`; node = id, title or class_type; value parsed as JSON when it parses."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise WorkflowError(f"--set {item!r}: use NODE.INPUT=VALUE, e.g. sampler.steps=4.")
        # an exact id, title or class wins over a part of a class name (FlipbookWanTextEncode vs ...EncoderLoader)
        matches = ([k for k, v in prompt.items() if node_ref in (k, v["_meta"]["title"], v["class_type"])]
                   or [k for k, v in prompt.items() if node_ref.lower() in v["class_type"].lower()])
        if len(matches) != 1:
            raise WorkflowError(f"--set {item!r}: {node_ref!r} matches {len(matches)} nodes; use the node id.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        known = [n for n, _ in _ordered_inputs(mappings[prompt[matches[0]]["class_type"]])]
        if name not in known:
            raise WorkflowError(f"--set {item!r}: {prompt[matches[0]]['class_type']} has no input {name!r}; "
                                f"inputs: {', '.join(known)}.")
        prompt[matches[0]]["inputs"][name] = value


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


_CONVERT = {"INT": int, "FLOAT": float}


def _coerce(name: str, spec: tuple, value: Any) -> tuple[Any, list[str]]:
    """The value as ComfyUI's validation converts numbers (int(), float()), or why it cannot be: types before
    ranges. Stricter than ComfyUI for text and booleans, which it passes through str()/bool(): a null prompt
    would become the text "None"."""
    kind = spec[0]
    if isinstance(kind, str) and kind in _CONVERT:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return value, [f"{name}={value!r} is not a number ({kind})"]
        try:
            return _CONVERT[kind](value), []
        except (TypeError, ValueError, OverflowError):
            return value, [f"{name}={value!r} is not a number ({kind})"]
    if kind == "STRING" and not isinstance(value, str):
        return value, [f"{name}={value!r} is not text; give a string (\"\" for none)"]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return value, [f"{name}={value!r} is not true or false"]
    return value, []


def _widget_errors(name: str, spec: tuple, value: Any) -> list[str]:
    if isinstance(spec[0], (list, tuple)):
        return [] if value in spec[0] else [f"{name}={value!r} is not one of {list(spec[0])[:8]}"]
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] == "FLOAT" and isinstance(value, float) and not math.isfinite(value):
        return [f"{name}={value} is not a finite number"]
    if spec[0] in ("INT", "FLOAT") and isinstance(value, (int, float)):
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            return [f"{name}={value} is outside {options.get('min')}-{options.get('max')}"]
    return []


def validate_prompt(prompt: Mapping[str, dict], mappings: Mapping[str, type]) -> None:
    """What ComfyUI checks when a prompt is queued: dropdown values, ranges, each node's validator."""
    problems = []
    for node_id, entry in prompt.items():
        node_class = mappings[entry["class_type"]]
        inputs = entry["inputs"]
        found_here = []
        for name, spec in _ordered_inputs(node_class):
            if name in inputs and not _is_link(inputs[name]) and _is_widget(spec):
                inputs[name], found = _coerce(name, spec, inputs[name])
                found_here += found or _widget_errors(name, spec, inputs[name])
        problems += [f"node {node_id} ({entry['class_type']}): {p}" for p in found_here]
        validator = getattr(node_class, "VALIDATE_INPUTS", None)
        if validator is not None and not found_here:  # a node's own checks assume the types are right
            wanted = inspect.getfullargspec(validator).args
            verdict = validator(**{k: v for k, v in inputs.items() if k in wanted and not _is_link(v)})
            if verdict is not True:
                problems.append(f"node {node_id} ({entry['class_type']}): {verdict}")
    if problems:
        raise WorkflowError("The workflow failed validation, nothing was run: " + "; ".join(problems))


def _order(prompt: Mapping[str, dict]) -> list[str]:
    done: list[str] = []

    def visit(node_id: str, trail: tuple[str, ...]) -> None:
        if node_id in done:
            return
        if node_id in trail:
            raise WorkflowError(f"The workflow has a cycle through node {node_id}.")
        for value in prompt[node_id]["inputs"].values():
            if _is_link(value):
                if value[0] not in prompt:
                    raise WorkflowError(f"Node {node_id} needs node {value[0]}, which is muted or missing.")
                visit(value[0], trail + (node_id,))
        done.append(node_id)

    for node_id in prompt:
        visit(node_id, ())
    return done


def run_prompt(prompt: Mapping[str, dict], mappings: Mapping[str, type], workflow: Any = None) -> dict[str, Any]:
    """Execute every node in dependency order; returns {node_id: ui dict} of output nodes."""
    results: dict[str, tuple] = {}
    ui: dict[str, Any] = {}
    for node_id in _order(prompt):
        entry = prompt[node_id]
        node_class = mappings[entry["class_type"]]
        kwargs = {k: (results[v[0]][v[1]] if _is_link(v) else v) for k, v in entry["inputs"].items()}
        hidden = node_class.INPUT_TYPES().get("hidden", {})
        if "prompt" in hidden:
            kwargs["prompt"] = dict(prompt)
        if "extra_pnginfo" in hidden:
            kwargs["extra_pnginfo"] = {"workflow": workflow} if workflow is not None else None
        if "unique_id" in hidden:
            kwargs["unique_id"] = node_id
        log.info("running node %s (%s)", node_id, entry["class_type"])
        output = getattr(node_class(), node_class.FUNCTION)(**kwargs)
        if isinstance(output, dict):
            ui[node_id] = output.get("ui", {})
            output = output.get("result", ())
        results[node_id] = tuple(output)
    return ui
