"""NodeSpec -> ComfyUI V3 nodes (comfy_api io.ComfyNode), the API new ComfyUI features land in."""
from __future__ import annotations

from typing import Any, Optional

from .specs import NodeSpec, Param

WIDGETS = {"INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean"}
LINKS = {"IMAGE": "Image", "AUDIO": "Audio", "VIDEO": "Video", "FLOAT": "Float", "INT": "Int", "LATENT": "Latent",
         "CONDITIONING": "Conditioning"}


def _input(io: Any, param: Param):
    common = dict(tooltip=param.tooltip, optional=param.optional)
    if param.kind == "COMBO":
        options = dict(param.options)
        if options.pop("video_upload", False):  # V1 spelling of the upload button
            options["upload"] = io.UploadType.video
        return io.Combo.Input(param.name, options=param.choices(), **common, **options)
    if param.kind in WIDGETS:
        return getattr(io, WIDGETS[param.kind]).Input(param.name, **common, **param.options)
    link = getattr(io, LINKS[param.kind]) if param.kind in LINKS else io.Custom(param.kind)
    return link.Input(param.name, **common)


def _output(io: Any, kind: str, name: str, tooltip: Optional[str] = None):
    known = LINKS.get(kind) or WIDGETS.get(kind)  # STRING/BOOLEAN outputs are the widget types' outputs
    link = getattr(io, known) if known else io.Custom(kind)
    return link.Output(display_name=name, **({"tooltip": tooltip} if tooltip else {}))


def v3_class(spec: NodeSpec, io: Any) -> type:
    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
            description=spec.description, inputs=[_input(io, p) for p in spec.inputs],
            outputs=[_output(io, kind, name, tip) for (kind, name), tip in
                     zip(spec.outputs, spec.output_tooltips or (None,) * len(spec.outputs))],
            hidden=[getattr(io.Hidden, name) for name in spec.hidden], is_output_node=spec.output_node,
        )

    def execute(cls, **inputs):
        for name in spec.hidden:
            inputs[name] = getattr(cls.hidden, name, None)
        result = spec.run(**inputs)
        return io.NodeOutput(*result.outputs, ui=result.ui)

    extra = {"validate_inputs": classmethod(spec.validate)} if spec.validate else {}
    if spec.fingerprint:
        extra["fingerprint_inputs"] = classmethod(spec.fingerprint)
    return type(spec.node_id, (io.ComfyNode,), {
        **extra,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    })


def v3_entrypoint(specs: tuple[NodeSpec, ...], api: Any):
    """`comfy_entrypoint` for ComfyUI: an extension listing one V3 node per spec."""
    nodes = [v3_class(spec, api.io) for spec in specs]

    class FlipbookExtension(api.ComfyExtension):
        async def get_node_list(self):
            return nodes

    async def comfy_entrypoint():
        return FlipbookExtension()

    return comfy_entrypoint
