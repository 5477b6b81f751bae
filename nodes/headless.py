"""Run a UI-format workflow (version 0.4, as the frontend saves it) through our node classes, no server.

The conversion mirrors the frontend's graphToPrompt: widget values are assigned to inputs in
INPUT_TYPES order, the `control_after_generate` value that follows a seed is skipped, links become
[node_id, slot] references. The result is also the API `prompt` embedded in saved files.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from ..core.errors import WorkflowError

log = logging.getLogger(__name__)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


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


def _node_inputs(node: Mapping[str, Any], node_class, links: Mapping[int, list]) -> dict[str, Any]:
    linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
    values = list(node.get("widgets_values") or [])
    inputs: dict[str, Any] = {}
    for name, spec in _ordered_inputs(node_class):
        if _is_widget(spec) and name not in linked and values:
            inputs[name] = values.pop(0)
            if _has_control_widget(name, spec) and values:
                values.pop(0)
        elif _is_widget(spec) and name in linked and values:
            values.pop(0)  # a widget converted to an input still keeps its slot in widgets_values
            if _has_control_widget(name, spec) and values:
                values.pop(0)
        if name in linked:
            link = links.get(linked[name])
            if link is None:
                raise WorkflowError(f"Node {node['id']} input {name!r} refers to missing link {linked[name]}.")
            inputs[name] = [str(link[1]), int(link[2])]
    return inputs


def workflow_to_prompt(workflow: Mapping[str, Any], mappings: Mapping[str, type]) -> dict[str, dict]:
    """UI workflow -> API prompt {id: {class_type, inputs, _meta}} for the nodes that run."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow.get("nodes", []):
        if node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        node_class = mappings.get(node["type"])
        if node_class is None:
            raise WorkflowError(
                f"Node {node['id']} has type {node['type']!r}, which headless runs do not know. "
                f"Known: {', '.join(sorted(mappings))}."
            )
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": _node_inputs(node, node_class, links),
            "_meta": {"title": node.get("title") or node["type"]},
        }
    return prompt


def apply_overrides(prompt: dict[str, dict], overrides: list[str]) -> None:
    """`node.input=value`; node = id, title or class_type; value parsed as JSON when it parses."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise WorkflowError(f"--set {item!r}: use NODE.INPUT=VALUE, e.g. sampler.steps=4.")
        matches = [k for k, v in prompt.items()
                   if node_ref in (k, v["_meta"]["title"], v["class_type"])
                   or node_ref.lower() in v["class_type"].lower()]
        if len(matches) != 1:
            raise WorkflowError(f"--set {item!r}: {node_ref!r} matches {len(matches)} nodes; use the node id.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        prompt[matches[0]]["inputs"][name] = value


def _order(prompt: Mapping[str, dict]) -> list[str]:
    done: list[str] = []

    def visit(node_id: str, trail: tuple[str, ...]) -> None:
        if node_id in done:
            return
        if node_id in trail:
            raise WorkflowError(f"The workflow has a cycle through node {node_id}.")
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
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
        kwargs = {k: (results[v[0]][v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v)
                  for k, v in entry["inputs"].items()}
        hidden = node_class.INPUT_TYPES().get("hidden", {})
        if "prompt" in hidden:
            kwargs["prompt"] = dict(prompt)
        if "extra_pnginfo" in hidden:
            kwargs["extra_pnginfo"] = {"workflow": workflow} if workflow is not None else None
        log.info("running node %s (%s)", node_id, entry["class_type"])
        output = getattr(node_class(), node_class.FUNCTION)(**kwargs)
        if isinstance(output, dict):
            ui[node_id] = output.get("ui", {})
            output = output.get("result", ())
        results[node_id] = tuple(output)
    return ui
