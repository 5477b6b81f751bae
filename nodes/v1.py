"""NodeSpec -> ComfyUI V1 node classes (INPUT_TYPES / FUNCTION). Used by headless runs and tests, and
by ComfyUI builds that lack the V3 API."""
from __future__ import annotations

from .specs import NodeSpec, Param

HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}


def input_entry(param: Param) -> tuple:
    kind = param.choices() if param.kind == "COMBO" else param.kind
    return (kind, {**param.options, "tooltip": param.tooltip})


def v1_class(spec: NodeSpec) -> type:
    def input_types(cls):
        types = {"required": {p.name: input_entry(p) for p in spec.inputs if not p.optional}}
        optional = {p.name: input_entry(p) for p in spec.inputs if p.optional}
        if optional:
            types["optional"] = optional
        if spec.hidden:
            types["hidden"] = {name: HIDDEN[name] for name in spec.hidden}
        return types

    def execute(self, **inputs):
        result = spec.run(**inputs)
        return {"ui": result.ui, "result": result.outputs} if result.ui is not None else result.outputs

    extra = {"VALIDATE_INPUTS": classmethod(spec.validate)} if spec.validate else {}
    if spec.fingerprint:
        extra["IS_CHANGED"] = classmethod(spec.fingerprint)
    return type(spec.node_id, (), {
        **extra,
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(kind for kind, _ in spec.outputs),
        "RETURN_NAMES": tuple(name for _, name in spec.outputs),
        **({"OUTPUT_TOOLTIPS": spec.output_tooltips} if spec.output_tooltips else {}),
        "FUNCTION": "execute",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "SPEC": spec,
        "execute": execute,
    })
