"""nodes/ (lightning nodes, _comfy): node schemas, UI notes, the bundled workflow, headless runs, the CLI demo,
and the nodes inside a fake ComfyUI."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS, cli
from flipbook_pack.core.media.readers import read_mp4_metadata
from flipbook_pack.core.media.metadata import encode_value
from flipbook_pack.nodes import _comfy
from flipbook_pack.nodes.headless import _has_control_widget, _is_widget, apply_overrides, workflow_to_prompt

ROOT = Path(__file__).resolve().parent.parent.parent
WORKFLOW = json.loads((ROOT / "workflows" / "lightning_4step_t2v.json").read_text())


def test_node_ids_are_prefixed_and_every_input_has_a_tooltip():
    for node_id, node in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Flipbook") and node.CATEGORY.startswith("Flipbook")
        assert hasattr(node, node.FUNCTION) and node.DESCRIPTION
        types = node.INPUT_TYPES()
        for name, spec in {**types["required"], **types.get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_bundled_workflow_is_frontend_shaped_and_uses_only_our_nodes():
    assert WORKFLOW["version"] == 0.4 and WORKFLOW["last_node_id"] == max(n["id"] for n in WORKFLOW["nodes"])
    for node in WORKFLOW["nodes"]:
        if node["type"] == "Note":
            continue
        node_class = NODE_CLASS_MAPPINGS[node["type"]]
        types = node_class.INPUT_TYPES()
        widgets = [(n, s) for n, s in {**types["required"], **types.get("optional", {})}.items() if _is_widget(s)]
        expected = len(widgets) + sum(_has_control_widget(n, s) for n, s in widgets)
        assert len(node["widgets_values"]) == expected, node["type"]
    for link in WORKFLOW["links"]:
        link_id, origin, _, target, _, kind = link
        assert any(i["link"] == link_id and i["type"] == kind
                   for n in WORKFLOW["nodes"] if n["id"] == target for i in n["inputs"])
    models = WORKFLOW["nodes"][0]["properties"]["models"]
    assert all(m["url"].startswith("https://huggingface.co/") and m["url"].endswith(m["name"]) for m in models)


def test_workflow_to_prompt_skips_the_seed_control_value():
    prompt = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    sampler = prompt["2"]["inputs"]
    assert sampler["model"] == ["1", 0] and sampler["seed"] == 42 and sampler["frames"] == 16
    assert (sampler["steps"], sampler["cfg"], sampler["scheduler"], sampler["motion_scale"]) == (4, 1.0, "trailing", 1.0)
    assert prompt["3"]["inputs"]["images"] == ["2", 0] and prompt["3"]["inputs"]["crf"] == 19
    assert prompt["3"]["inputs"]["pingpong"] is False and "audio" not in prompt["3"]["inputs"]
    apply_overrides(prompt, ["FlipbookLightningSampler.width=64", "2.prompt=hello world"], NODE_CLASS_MAPPINGS)
    assert sampler["width"] == 64 and sampler["prompt"] == "hello world"


@pytest.fixture()
def demo_output(tmp_path, capsys):
    assert cli.main(["demo", "lightning", "--models-dir", str(tmp_path / "models"),
                     "--output-dir", str(tmp_path / "out")]) == 0
    return tmp_path, Path(capsys.readouterr().out.strip())


def test_cli_demo_writes_a_16_frame_mp4_with_workflow_and_prompt(demo_output):
    import av

    tmp_path, video = demo_output
    assert video.parent == tmp_path / "out" / "flipbook" and video.suffix == ".mp4"
    assert (tmp_path / "models" / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors").is_file()
    assert (tmp_path / "models" / "animatediff_models" / "animatediff_lightning_4step_comfyui.safetensors").is_file()
    found = read_mp4_metadata(video)
    assert found["workflow"] == json.loads(encode_value(WORKFLOW))
    assert found["prompt"]["2"]["class_type"] == "FlipbookLightningSampler"
    assert found["prompt"]["2"]["inputs"]["width"] == 64
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16


def test_cli_run_with_overrides_and_inspect(demo_output, capsys):
    tmp_path, _ = demo_output
    assert cli.main(["run", "lightning_4step_t2v.json", "--models", str(tmp_path / "models"), "--output-dir",
                     str(tmp_path / "out"), "--set", "FlipbookLightningSampler.width=64",
                     "--set", "FlipbookLightningSampler.height=64", "--set", "FlipbookLightningSampler.frames=8"]) == 0
    video = Path(capsys.readouterr().out.strip())
    assert video.name == "lightning_00002_.mp4"
    import av

    with av.open(str(video)) as container:  # the overrides took effect
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 8 and stream.codec_context.width == 64
    assert cli.main(["inspect", str(video)]) == 0
    assert '"workflow": "4 nodes"' in capsys.readouterr().out


def _save_inputs(prefix, fmt="mp4"):
    return dict(filename_prefix=prefix, fps=8.0, format=fmt, crf=19, pix_fmt="yuv420p", loop=0, pingpong=False,
                quality=90)


def _sampler_inputs(model):
    return dict(model=model, prompt="a fox", negative="", seed=1, frames=4, width=64, height=64, steps=4, cfg=1.0,
                scheduler="trailing", motion_scale=1.0)


class Interrupted(Exception):
    pass


@pytest.fixture()
def fake_comfy(tiny_models, tmp_path, monkeypatch):
    """Minimal stand-ins for folder_paths, comfy.utils, comfy.model_management, comfy.cli_args."""
    root, _ = tiny_models
    state = {"interrupt_after": None, "updates": [], "device": torch.device("cpu")}
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.folder_names_and_paths = {"checkpoints": ([str(root / "checkpoints")], {".safetensors"})}
    folder_paths.models_dir = str(root)
    folder_paths.get_filename_list = lambda f: sorted(p.name for p in Path(folder_paths.folder_names_and_paths[f][0][0]).iterdir())
    folder_paths.get_full_path = lambda f, n: str(Path(folder_paths.folder_names_and_paths[f][0][0]) / n)
    folder_paths.get_folder_paths = lambda f: folder_paths.folder_names_and_paths[f][0]
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")

    def add_model_folder_path(name, path, is_default=False):  # as ComfyUI: a new name gets an empty set
        paths, _ = folder_paths.folder_names_and_paths.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    folder_paths.add_model_folder_path = add_model_folder_path
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            state["updates"].append((value, total))

    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")

    def check():
        if state["interrupt_after"] is not None and len(state["updates"]) >= state["interrupt_after"]:
            raise Interrupted()

    management.throw_exception_if_processing_interrupted = check
    management.get_torch_device = lambda: state["device"]
    management.should_use_fp16 = lambda device: False  # as ComfyUI answers for a CPU (or --force-fp32)
    management.should_use_bf16 = lambda device: False
    management.unet_dtype = lambda device=None, supported_dtypes=(): torch.float32  # a CPU (or --fp32-unet)
    management.unet_offload_device = lambda: torch.device("cpu")
    management.text_encoder_device = lambda: state["device"]
    management.text_encoder_offload_device = lambda: torch.device("cpu")
    management.text_encoder_dtype = lambda device=None: torch.float16  # ComfyUI's answer, also for a CPU
    management.vae_device = lambda: state["device"]
    management.vae_offload_device = lambda: torch.device("cpu")
    management.vae_dtype = lambda device=None, allowed=(): torch.float32
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=False)
    comfy = types.ModuleType("comfy")
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                         "comfy.model_management": management, "comfy.cli_args": cli_args}.items():
        monkeypatch.setitem(sys.modules, name, module)
    _comfy.register_model_folders()
    return state, cli_args


def test_nodes_inside_comfyui_list_models_report_progress_and_save(fake_comfy, tmp_path):
    state, cli_args = fake_comfy
    loader = NODE_CLASS_MAPPINGS["FlipbookLightningLoader"]
    choices = loader.INPUT_TYPES()["required"]["motion_model"][0]
    assert "animatediff_lightning_4step_comfyui.safetensors" in choices
    (model,) = loader().execute(ckpt_name="tiny_sd15.safetensors", variant="auto", policy="strict",
                                motion_model="animatediff_lightning_4step_comfyui.safetensors")
    frames, latent = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]().execute(**_sampler_inputs(model))
    assert frames.shape == (4, 64, 64, 3) and state["updates"][-1][0] == state["updates"][-1][1]
    assert latent["samples"].shape == (4, 4, 8, 8)  # ComfyUI's SD1.5 LATENT: one latent per frame
    assert model.device.type == "cpu"  # ComfyUI's device choice (--cpu here) is honoured
    cli_args.args.disable_metadata = True
    out = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"]().execute(
        images=frames, prompt={"1": {}}, extra_pnginfo={"workflow": {"nodes": []}}, **_save_inputs("fb/x"))
    entry = out["ui"]["images"][0]
    assert entry["subfolder"] == "fb" and out["ui"]["animated"] == (True,)
    assert read_mp4_metadata(tmp_path / "output" / "fb" / entry["filename"]) == {}  # --disable-metadata


def test_cancel_stops_sampling(fake_comfy):
    state, _ = fake_comfy
    loader = NODE_CLASS_MAPPINGS["FlipbookLightningLoader"]
    (model,) = loader().execute(ckpt_name="tiny_sd15.safetensors", variant="auto", policy="strict",
                                motion_model="animatediff_lightning_4step_comfyui.safetensors")
    state["interrupt_after"] = 2
    with pytest.raises(Interrupted):
        NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]().execute(**_sampler_inputs(model))
    assert len(state["updates"]) == 2 


# keyword parameters of comfy_api.latest io.<Type>.Input in ComfyUI 0.3.64 (comfy_api/latest/_io.py)
_COMMON = {"display_name", "optional", "tooltip", "lazy"}
_ACCEPTS = {
    "INT": _COMMON | {"default", "min", "max", "step", "control_after_generate", "display_mode", "socketless",
                      "force_input"},
    "FLOAT": _COMMON | {"default", "min", "max", "step", "round", "display_mode", "socketless", "force_input"},
    "STRING": _COMMON | {"multiline", "placeholder", "default", "dynamic_prompts", "socketless", "force_input"},
    "BOOLEAN": _COMMON | {"default", "label_on", "label_off", "socketless", "force_input"},
    "COMBO": _COMMON | {"options", "default", "control_after_generate", "upload", "image_folder", "remote",
                        "socketless"},
}


def _fake_io():
    """Records what the V3 adapter asks of comfy_api's io module, refusing keywords the real one lacks."""
    io = types.SimpleNamespace()

    def kind(type_name):
        class Input:
            def __init__(self, name, **kw):
                unknown = set(kw) - _ACCEPTS.get(type_name, _COMMON)
                assert not unknown, f"io {type_name}.Input has no parameter(s) {unknown}"
                self.type, self.name, self.kw = type_name, name, kw

        class Output:
            def __init__(self, **kw):
                self.type, self.kw = type_name, kw

        return types.SimpleNamespace(Input=Input, Output=Output)

    for name, type_name in (("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"),
                            ("Combo", "COMBO"), ("Image", "IMAGE"), ("Audio", "AUDIO"), ("Video", "VIDEO"),
                            ("Latent", "LATENT"), ("Conditioning", "CONDITIONING")):
        setattr(io, name, kind(type_name))
    io.UploadType = types.SimpleNamespace(video="video_upload")
    io.Custom = kind
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.Hidden = types.SimpleNamespace(prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO", unique_id="UNIQUE_ID")
    io.NodeOutput = lambda *args, ui=None: types.SimpleNamespace(args=args, ui=ui)
    io.ComfyNode = object
    return io


def test_v3_schema_mirrors_the_v1_inputs_in_order():
    from flipbook_pack.nodes import SPECS
    from flipbook_pack.nodes.v3 import v3_class

    io = _fake_io()
    for spec in SPECS:
        schema = v3_class(spec, io).define_schema()
        if spec.needs_video_api:
            assert spec.node_id not in NODE_CLASS_MAPPINGS  # no native VIDEO outside ComfyUI's V3 API
            continue
        v1 = NODE_CLASS_MAPPINGS[spec.node_id].INPUT_TYPES()
        v1_inputs = {**v1["required"], **v1.get("optional", {})}
        assert schema.node_id == spec.node_id and [i.name for i in schema.inputs] == [p.name for p in spec.inputs]
        assert set(v1_inputs) == {p.name for p in spec.inputs}
        for item in schema.inputs:
            v1_options = v1_inputs[item.name][1]
            assert item.kw["tooltip"] == v1_options["tooltip"]
            assert item.kw["optional"] == (item.name in v1.get("optional", {}))
            for key in ("default", "min", "max", "step", "round", "multiline", "control_after_generate"):
                assert item.kw.get(key) == v1_options.get(key), (spec.node_id, item.name, key)
            if item.type == "COMBO":
                assert item.kw["options"] == v1_inputs[item.name][0]
        for hook, v1_name in (("validate_inputs", "VALIDATE_INPUTS"), ("fingerprint_inputs", "IS_CHANGED")):
            v3_class_obj = v3_class(spec, io)
            assert hasattr(v3_class_obj, hook) == hasattr(NODE_CLASS_MAPPINGS[spec.node_id], v1_name)
        assert [o.type for o in schema.outputs] == list(NODE_CLASS_MAPPINGS[spec.node_id].RETURN_TYPES)
        assert schema.hidden == [getattr(io.Hidden, h) for h in spec.hidden]


def test_v3_execute_passes_hidden_values_and_ui(tmp_path):
    from flipbook_pack.nodes.v3 import v3_class
    from flipbook_pack.nodes.video_nodes import SAVE_VIDEO

    node = v3_class(SAVE_VIDEO, _fake_io())
    node.hidden = types.SimpleNamespace(prompt={"1": {"class_type": "X", "inputs": {}}}, extra_pnginfo={"workflow": {"a": 1}})
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path, output_dir=tmp_path))
    try:
        out = node.execute(images=torch.rand(2, 16, 16, 3), **_save_inputs("v3"))
    finally:
        _comfy.use_headless(None)
    saved = tmp_path / out.ui["images"][0]["filename"]
    assert read_mp4_metadata(saved) == {"workflow": {"a": 1}, "prompt": {"1": {"class_type": "X", "inputs": {}}}}


def test_components_are_placed_where_comfyui_places_its_own(fake_comfy):
    state, _ = fake_comfy
    cpu = torch.device("cpu")
    assert _comfy.component_placements() == {
        "unet": (cpu, cpu, torch.float32),
        "text_encoder": (cpu, cpu, torch.float32),  # stored fp16 by ComfyUI but computed in fp32 on a CPU
        "vae": (cpu, cpu, torch.float32),
    }
    state["device"] = torch.device("cuda")
    placements = _comfy.component_placements()
    assert placements["unet"][0] == placements["text_encoder"][0] == torch.device("cuda")
    assert placements["text_encoder"][2] == torch.float16 and _comfy.torch_device() == "cuda"
    # this stand-in has no comfy.model_patcher: the pipeline keeps its own (headless) memory policy
    assert _comfy.memory_for(object()) is None
