"""Batch variations on the Lightning path: a seed list x a prompt list, one clip each (saved with a workflow that
re-renders that one clip) and a contact sheet. A thin adapter over the sampler node and the video save."""
from __future__ import annotations

import copy

from . import _comfy
from .lightning_nodes import CATEGORY, MODEL_TYPE, SAMPLER, _sample
from .specs import NodeResult, NodeSpec, Param, WIDGET_KINDS


def _batch(model, prompts, negative, seeds, frames, width, height, steps, cfg, scheduler, motion_scale,
           filename_prefix, format, fps, prompt=None, extra_pnginfo=None, unique_id=None) -> NodeResult:
    from ..core.errors import InvalidSettingError
    from ..core.media.metadata import build_metadata
    from ..core.media.save import VideoSettings, save_video
    from ..core.variations import check_batch_size, contact_sheet, parse_prompt_list, parse_seed_list
    from .video_nodes import _prefix_problem

    texts, seed_list = parse_prompt_list(prompts), parse_seed_list(seeds)  # bad lists: nothing runs or is written
    check_batch_size(len(texts), len(seed_list))
    if (problem := _prefix_problem(filename_prefix)) is not None:
        raise InvalidSettingError(problem)
    rows, saved, notes = [], [], []
    for row, text in enumerate(texts):
        cells = []
        for seed in seed_list:
            result = _sample(model, text, negative, seed, frames, width, height, steps, cfg, scheduler, motion_scale)
            clip = result.outputs[0]
            notes += [n for n in (result.ui or {}).get("flipbook_notes", []) if n not in notes]
            one_prompt, one_extra, narrowed = _one_clip(prompt, extra_pnginfo, unique_id, text=text, seed=seed)
            if not narrowed and (note := LINKED_NOTE) not in notes:
                notes.append(note)
            metadata = build_metadata(one_prompt, one_extra, disabled=_comfy.metadata_disabled())
            file = save_video(clip, output_dir=_comfy.output_dir(), filename_prefix=filename_prefix, format_id=format,
                              settings=VideoSettings(fps=fps), metadata=metadata)
            saved.append({"filename": file.path.name, "subfolder": file.subfolder, "type": "output"})
            cells.append(clip[len(clip) // 2].clone())  # not a view: the clip's frames are freed
        rows.append(cells)
        notes.append(f"row {row + 1}: {text if len(text) <= 60 else text[:57] + '...'}")
    sheet = contact_sheet(rows)
    # the sheet as a PNG beside the clips, with the whole batch's workflow (headless runs have no image node)
    file = save_video(sheet, output_dir=_comfy.output_dir(), filename_prefix=filename_prefix + "_sheet",
                      format_id="png", settings=VideoSettings(fps=fps),
                      metadata=build_metadata(prompt, extra_pnginfo, disabled=_comfy.metadata_disabled()))
    notes.insert(0, f"{len(texts)} prompts x {len(seed_list)} seeds = {len(saved)} clips; contact sheet "
                    f"{file.path.name}: rows are prompts, columns seeds {', '.join(map(str, seed_list))} (the middle "
                    "frame of each clip)")
    saved.append({"filename": file.path.name, "subfolder": file.subfolder, "type": "output"})
    return NodeResult((sheet,), {"images": saved, "animated": (True,), "flipbook_notes": notes})


LINKED_NOTE = ("prompts or seeds come through a link: each clip's saved workflow keeps that link, so dropping it "
               "re-runs the whole batch (its embedded API prompt holds the clip's own prompt and seed)")


def _check_batch(cls, prompts=None, seeds=None, filename_prefix=None):
    """When queued: an empty or malformed list fails before anything runs (values through links: at run time)."""
    from ..core.errors import InvalidSettingError
    from ..core.variations import check_batch_size, parse_prompt_list, parse_seed_list
    from .video_nodes import _prefix_problem

    try:
        texts = None if prompts is None else parse_prompt_list(prompts)
        seed_list = None if seeds is None else parse_seed_list(seeds)
        if texts and seed_list:
            check_batch_size(len(texts), len(seed_list))
    except InvalidSettingError as exc:
        return str(exc)
    return _prefix_problem(filename_prefix) or True


def _one_clip(prompt, extra_pnginfo, unique_id, *, text: str, seed: int):
    """The run's API prompt and UI workflow with this node narrowed to one prompt and one seed: dropping the clip
    onto ComfyUI re-renders exactly it (change the tier there to re-render it at another). Returns (prompt, extra
    pnginfo, whether the UI workflow could be narrowed: not where prompts/seeds arrive through links)."""
    values = {"prompts": text, "seeds": str(seed)}
    one_prompt = copy.deepcopy(prompt) if isinstance(prompt, dict) else None
    if one_prompt is not None and unique_id in one_prompt:
        one_prompt[unique_id]["inputs"].update(values)
    extra = copy.deepcopy(extra_pnginfo) if isinstance(extra_pnginfo, dict) else None
    node = _workflow_node((extra or {}).get("workflow"), unique_id)
    linked = {i.get("name") for i in (node or {}).get("inputs", []) if i.get("link") is not None}
    if node is not None and isinstance(node.get("widgets_values"), list):
        for name, value in values.items():
            index = _widget_index(name)
            if index < len(node["widgets_values"]) and name not in linked:
                node["widgets_values"][index] = value
    return one_prompt, extra, not (linked & set(values))


def _workflow_node(workflow, unique_id):
    """This node in the UI workflow: top level, or inside a subgraph (ComfyUI ids it "<graph node>:<node>")."""
    if not isinstance(workflow, dict) or unique_id is None:
        return None
    own_id = str(unique_id).rpartition(":")[2]
    graphs = [workflow, *((workflow.get("definitions") or {}).get("subgraphs") or [])]
    candidates = [n for g in graphs for n in g.get("nodes", []) if str(n.get("id")) == own_id]
    return candidates[0] if len(candidates) == 1 else None


def _widget_index(name: str) -> int:
    """Where the frontend stores this widget's value in widgets_values (seed widgets add a control value)."""
    index = 0
    for param in BATCH.inputs:
        if param.name == name:
            return index
        if param.kind in WIDGET_KINDS:
            index += 2 if param.options.get("control_after_generate") else 1
    raise KeyError(name)


def _sampler_param(name: str) -> Param:
    return next(p for p in SAMPLER.inputs if p.name == name)


BATCH = NodeSpec(
    node_id="FlipbookLightningBatch",
    display_name="Flipbook AnimateDiff-Lightning Batch Variations (seed list x prompt list, contact sheet)",
    category=CATEGORY,
    description="Renders every prompt of a list with every seed of a list (one model load), saves each clip with a "
                "workflow that re-renders that clip alone, and returns a contact sheet: explore many 4-step "
                "variations, pick one, re-render it at a higher tier.",
    inputs=(
        Param("model", MODEL_TYPE, "From a Flipbook AnimateDiff-Lightning loader (or the tier loader)."),
        Param("prompts", "STRING", "One prompt per line; each is rendered with every seed.",
              {"multiline": True, "default": ""}),
        _sampler_param("negative"),
        Param("seeds", "STRING", "Seeds, e.g. '1, 2, 5-8' (stays fixed between runs, so a pick is reproducible).",
              {"default": "1-4"}),
        *(_sampler_param(name) for name in ("frames", "width", "height", "steps", "cfg", "scheduler",
                                            "motion_scale")),
        Param("filename_prefix", "STRING", "Each clip is saved as <prefix>_00001_.<ext>, in the output folder.",
              {"default": "flipbook/variations"}),
        Param("format", "COMBO", "mp4, webm, webp or png keep the clip's workflow.", {"default": "mp4"},
              choices=lambda: ["mp4", "webm", "webp", "png"]),
        Param("fps", "FLOAT", "Frames per second of the saved clips.",
              {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.1, "round": 0.001}),
    ),
    outputs=(("IMAGE", "contact_sheet"),),
    run=_batch,
    validate=_check_batch,
    hidden=("prompt", "extra_pnginfo", "unique_id"),
    output_node=True,
    output_tooltips=("One frame of every clip in a grid: rows are the prompts, columns the seeds.",),
)

SPECS = (BATCH,)
