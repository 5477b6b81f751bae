"""Every bundled Lightning workflow: frontend-shaped (widget counts as the nodes declare them, links typed), only
Flipbook nodes plus the core nodes it names, "randomize" seeds, a Note, a layout inside a 1280x800 window, a
thumbnail; the ones made of Flipbook nodes run headless on tiny models (`flipbook demo <name>`) and their files
restore the workflow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flipbook_pack import NODE_CLASS_MAPPINGS, cli
from flipbook_pack.core.media.readers import read_workflow
from flipbook_pack.nodes.headless import _has_control_widget, _is_widget

ROOT = Path(__file__).resolve().parent.parent.parent
ALL = sorted((ROOT / "workflows").glob("*.json"))
LIGHTNING = [p for p in ALL if p.name.startswith("lightning_")]
# core nodes the ComfyUI-only workflows use, with their widget counts (ComfyUI 0.3.64 nodes.py; LoadImage adds the
# frontend's upload widget value)
CORE = {"CheckpointLoaderSimple": 1, "LoraLoader": 3, "CLIPSetLastLayer": 1, "VAELoader": 1, "LoadImage": 2,
        "PreviewImage": 0, "Note": 1}
# a 1280x800 window: in frontend 1.58 the canvas spans it under the sidebar (56 px) and top bars (about 90 px);
# 1.27 starts the canvas 40 px further right and down, so 40 px stay free on the right and at the bottom
VISIBLE = ((56, 90), (1240, 760))
TITLE_BAR = 30


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_issue_lists_every_workflow():
    names = {p.stem for p in LIGHTNING}
    assert {"lightning_4step_lora_motion_lora", "lightning_core_checkpoint_lora", "lightning_vid2vid",
            "lightning_image_to_animation", "lightning_64frames_context_windows", "lightning_quality_tiers",
            "lightning_seed_batch"} <= names
    assert set(cli.HEADLESS_LIGHTNING) <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_workflow_is_frontend_shaped_with_known_nodes_and_typed_links(path):
    workflow = _load(path)
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    assert path.with_suffix(".jpg").is_file()  # the template thumbnail
    for node in workflow["nodes"]:
        for model in node["properties"].get("models", []):  # the frontend's missing-model downloads
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])
            assert model["name"] in node["widgets_values"]
        if node["type"] in CORE:
            assert len(node["widgets_values"]) == CORE[node["type"]], node["type"]
            continue
        types = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        widgets = [(n, s) for n, s in {**types["required"], **types.get("optional", {})}.items() if _is_widget(s)]
        assert len(node["widgets_values"]) == len(widgets) + sum(_has_control_widget(n, s) for n, s in widgets)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        assert nodes[origin]["outputs"][slot]["type"] == kind and link_id in nodes[origin]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot] == {**nodes[target]["inputs"][target_slot], "link": link_id,
                                                        "type": kind}


@pytest.mark.parametrize("path", LIGHTNING, ids=lambda p: p.stem)
def test_template_rules_randomize_note_layout_thumbnail(path):
    workflow = _load(path)
    seeds = [n["widgets_values"][3] for n in workflow["nodes"] if n["type"] == "FlipbookLightningSampler"]
    assert all(control == "randomize" for control in seeds)
    assert any(n["type"] == "Note" and len(n["widgets_values"][0]) > 200 for n in workflow["nodes"])
    scale, (dx, dy) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    (left, top), (right, bottom) = VISIBLE
    for node in workflow["nodes"]:  # screen = (pos + offset) * scale (litegraph's DragAndScale)
        (x, y), (w, h) = node["pos"], node["size"]
        assert left <= (x + dx) * scale and (x + dx + w) * scale <= right, node["title"]
        assert top <= (y - TITLE_BAR + dy) * scale and (y + dy + h) * scale <= bottom, node["title"]


@pytest.mark.parametrize("name", cli.HEADLESS_LIGHTNING)
def test_headless_workflows_run_on_tiny_models_and_their_files_restore(name, tmp_path, capsys):
    assert cli.main(["demo", name, "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out")]) == 0
    files = [Path(line) for line in capsys.readouterr().out.split()]
    assert files and all(f.is_file() for f in files)
    for file in files:
        restored = read_workflow(file)["workflow"]
        assert [n["type"] for n in restored["nodes"]] == [n["type"] for n in _load(ROOT / "workflows" / f"{name}.json")["nodes"]]
