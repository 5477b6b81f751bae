"""nodes/headless.py and the CLI: headless runs behave like ComfyUI's queue: frontend-only nodes, reroutes,
primitives, validation first, only nodes that feed an output; the CLI reports problems in one line."""
from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest

from flipbook_pack import NODE_CLASS_MAPPINGS, cli
from flipbook_pack.core.errors import ModelFileNotFoundError, WorkflowError
from flipbook_pack.nodes import _comfy
from flipbook_pack.nodes.headless import validate_prompt, workflow_to_prompt

ROOT = Path(__file__).resolve().parent.parent.parent
WORKFLOW = json.loads((ROOT / "workflows" / "lightning_4step_t2v.json").read_text())


def _with_extras():
    """The bundled workflow plus a Note, a Reroute between sampler and save, a PrimitiveNode driving
    the seed, and a second loader that feeds nothing."""
    wf = copy.deepcopy(WORKFLOW)
    nodes = {n["id"]: n for n in wf["nodes"]}
    wf["nodes"] += [
        {"id": 10, "type": "Note", "mode": 0, "widgets_values": ["remember to set fps"], "inputs": [], "outputs": []},
        {"id": 11, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 2}],
         "outputs": [{"name": "", "type": "IMAGE", "links": [20]}]},
        {"id": 12, "type": "PrimitiveNode", "mode": 0, "widgets_values": [42, "fixed"], "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [21]}]},
        {**copy.deepcopy(nodes[1]), "id": 13},
    ]
    wf["links"] = [link for link in wf["links"] if link[0] != 2] + [
        [2, 2, 0, 11, 0, "IMAGE"], [20, 11, 0, 3, 0, "IMAGE"], [21, 12, 0, 2, 3, "INT"]]
    nodes[3]["inputs"][0]["link"] = 20
    nodes[2]["inputs"].append({"name": "seed", "type": "INT", "link": 21, "widget": {"name": "seed"}})
    return wf


def test_frontend_only_nodes_reroutes_primitives_and_unused_nodes():
    prompt = workflow_to_prompt(_with_extras(), NODE_CLASS_MAPPINGS)
    assert sorted(prompt) == ["1", "2", "3"]  # no Note/Reroute/Primitive, no unused loader 13
    assert prompt["3"]["inputs"]["images"] == ["2", 0]  # through the reroute
    assert prompt["2"]["inputs"]["seed"] == 42 and prompt["2"]["inputs"]["frames"] == 16


@pytest.mark.parametrize("change,match", [
    ({"nodes": None}, "not a UI workflow"),
    ({"links": [{"id": 1}]}, "version-1"),
])
def test_malformed_workflows(change, match):
    with pytest.raises(WorkflowError, match=match):
        workflow_to_prompt({**WORKFLOW, **change}, NODE_CLASS_MAPPINGS)


def test_validation_runs_before_anything_and_lists_every_problem():
    prompt = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    prompt["3"]["inputs"]["crf"] = 70
    prompt["1"]["inputs"]["policy"] = "lenient"
    prompt["2"]["inputs"]["frames"] = 0
    with pytest.raises(WorkflowError) as info:
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)
    text = str(info.value)
    assert "policy='lenient'" in text and "frames=0" in text and "crf" in text and "nothing was run" in text


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    models = tmp_path / "models"
    assert cli.main(["run", "lightning_4step_t2v.json", "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flipbook: ") and "Traceback" not in err and "ckpt_name" in err
    assert cli.main(["run", "lightning_4step_t2v.json", "--models", str(models), "--set", "sampler.step=4"]) == 2
    assert "has no input 'step'" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.json"), "--models", str(models)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_runs_api_format_prompts(tmp_path, capsys):
    assert cli.main(["demo", "lightning", "--models-dir", str(tmp_path / "m"), "--output-dir", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    api = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    api["2"]["inputs"].update(width=64, height=64, frames=4)
    (tmp_path / "api.json").write_text(json.dumps(api))
    assert cli.main(["run", str(tmp_path / "api.json"), "--models", str(tmp_path / "m"),
                     "--output-dir", str(tmp_path / "o")]) == 0
    import av

    with av.open(capsys.readouterr().out.strip()) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 4 and stream.codec_context.width == 64


def test_symlinked_model_files_load_headless(tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    real.write_bytes(b"x")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "linked.safetensors").symlink_to(real)
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path / "models", output_dir=tmp_path))
    try:
        assert _comfy.model_path("checkpoints", "linked.safetensors").name == "linked.safetensors"
    finally:
        _comfy.use_headless(None)


def test_inside_comfyui_input_paths_stay_in_comfys_folders(tmp_path, monkeypatch):
    folders = {name: tmp_path / name for name in ("input", "output", "temp")}
    fake = types.SimpleNamespace(get_input_directory=lambda: str(folders["input"]),
                                 get_output_directory=lambda: str(folders["output"]),
                                 get_temp_directory=lambda: str(folders["temp"]))
    monkeypatch.setattr(_comfy, "_folder_paths", lambda: fake)
    assert _comfy.input_path("clip.mp4") == folders["input"] / "clip.mp4"
    assert _comfy.input_path("clip.mp4 [output]") == folders["output"] / "clip.mp4"
    for bad in ("/etc/passwd", "../secret.mp4", "a/../../b.mp4 [temp]"):
        with pytest.raises(ModelFileNotFoundError, match="outside"):
            _comfy.input_path(bad)
    check = NODE_CLASS_MAPPINGS["FlipbookLoadVideo"].VALIDATE_INPUTS
    assert "outside" in check(video="/etc/passwd") and "not in ComfyUI's input folder" in check(video="nope.mp4")


def test_animatediff_folder_is_added_even_when_already_registered(monkeypatch):
    registry = {"animatediff_models": (["/elsewhere/animatediff"], {".pt"})}

    def add(name, path, is_default=False):
        paths, _ = registry.setdefault(name, ([], set()))
        if path not in paths:
            paths.append(path)

    fake = types.SimpleNamespace(models_dir="/comfy/models", folder_names_and_paths=registry,
                                 add_model_folder_path=add)
    monkeypatch.setattr(_comfy, "_folder_paths", lambda: fake)
    _comfy.register_model_folders()
    paths, extensions = registry["animatediff_models"]
    assert paths == ["/elsewhere/animatediff", "/comfy/models/animatediff_models"] and ".safetensors" in extensions


@pytest.mark.parametrize("name,value,match", [
    ("cfg", float("nan"), "cfg=nan"),
    ("cfg", float("inf"), "cfg=inf"),
    ("cfg", "abc", "cfg='abc' is not a number"),
    ("motion_scale", float("nan"), "motion_scale=nan"),
    ("motion_scale", 3.0, "motion_scale=3.0"),
    ("prompt", "a (fox:nan)", r"prompt: Prompt weight \(fox:nan\) is nan"),
    ("prompt", 5, "prompt=5 is not text"),
])
def test_sampler_numbers_and_prompt_weights_are_checked_when_queued(name, value, match):
    prompt = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    prompt["2"]["inputs"][name] = value
    with pytest.raises(WorkflowError, match=match):
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)


def test_sane_sampler_inputs_pass_the_queue_check():
    check = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"].VALIDATE_INPUTS
    # what ComfyUI itself calls (it skips its own checks for these inputs): NaN passes every min/max test
    assert check(cfg=float("nan")) == "cfg=nan must be a finite number from 0.0 to 30.0"
    assert check(motion_scale="abc") == "motion_scale='abc' is not a number; use 0.5-1.5"
    assert check(prompt=5) == "prompt must be text, got int"
    assert check(prompt="a (fox:1.2) in snow", negative="", cfg=1.5, motion_scale=1.0) is True
    assert check() is True  # everything linked: checked at run time


@pytest.mark.parametrize("node,name,value,match", [
    ("2", "steps", "four", r"steps='four' is not a number \(INT\)"),
    ("2", "steps", None, r"steps=None is not a number"),
    ("2", "steps", True, r"steps=True is not a number"),
    ("3", "crf", "abc", r"crf='abc' is not a number \(INT\)"),
    ("2", "prompt", None, r"prompt=None is not text"),
    ("3", "fps", float("nan"), r"fps=nan is not a finite number"),
    ("3", "pingpong", "yes", r"pingpong='yes' is not true or false"),
])
def test_types_are_checked_before_ranges_when_queued(node, name, value, match):
    prompt = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    prompt[node]["inputs"][name] = value
    with pytest.raises(WorkflowError, match=match):
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)


def test_numbers_given_as_text_are_converted_as_comfyui_does():
    prompt = workflow_to_prompt(WORKFLOW, NODE_CLASS_MAPPINGS)
    prompt["2"]["inputs"]["steps"] = "4"
    with pytest.raises(WorkflowError) as info:  # only the (empty) model lists fail here
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)
    assert "steps" not in str(info.value) and prompt["2"]["inputs"]["steps"] == 4


def test_ctrl_c_in_the_cli_is_one_line(monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_workflow", interrupted)
    assert cli.main(["run", "x.json", "--models", "m"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("demo_models")
    cli.write_demo_models(models, WORKFLOW)
    return models


@pytest.mark.parametrize("override,match", [
    ("FlipbookLightningSampler.prompt=a (fox:nan) running", "Prompt weight"),
    ("FlipbookLightningSampler.cfg=NaN", "cfg=nan"),
    ("FlipbookLightningSampler.steps=four", "steps='four' is not a number"),
    ("FlipbookLightningSampler.negative=null", "negative=None is not text"),
    ("FlipbookSaveVideo.crf=abc", "crf='abc' is not a number"),
    ("FlipbookSaveVideo.fps=Infinity", "fps=inf"),
    ("FlipbookLightningSampler.frames=40", "turn on context windows"),
    ("FlipbookLightningSampler.denoise=0.5", "needs input frames"),
    ("FlipbookLightningSampler.denoise=0.1", "runs no step"),
    ("FlipbookLightningSampler.context_fuse=gauss", "context_fuse='gauss' is not one of"),
])
def test_bad_inputs_on_the_demo_models_are_one_line_and_write_nothing(demo_models, tmp_path, capsys, override,
                                                                      match):
    out = tmp_path / "out"
    code = cli.main(["run", "lightning_4step_t2v.json", "--models", str(demo_models), "--output-dir", str(out),
                     "--set", "FlipbookLightningSampler.width=64", "--set", "FlipbookLightningSampler.height=64",
                     "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() or not any(out.rglob("*"))


@pytest.fixture(scope="module")
def issue10_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("issue10_models")
    for name in ("lightning_seed_batch", "lightning_quality_tiers"):
        cli.write_demo_models(models, json.loads((ROOT / "workflows" / f"{name}.json").read_text()))
    return models


@pytest.mark.parametrize("workflow,overrides,match", [
    ("lightning_seed_batch", ["FlipbookLightningBatch.prompts= "], "The prompt list is empty"),
    ("lightning_seed_batch", ["FlipbookLightningBatch.seeds=1, x"], "'x' is not a seed"),
    ("lightning_seed_batch", ["FlipbookLightningBatch.seeds=0-300"], "more than 256"),
    ("lightning_seed_batch", ["FlipbookLightningBatch.filename_prefix=../up"], ".."),
    ("lightning_quality_tiers", ["FlipbookLightningTierLoader.tier=final", "FlipbookLightningTierLoader.final_steps=50"],
     "final_steps"),
    ("lightning_quality_tiers", ["FlipbookLightningTierLoader.tier=final",
                                 "FlipbookLightningTierLoader.final_motion=animatediff_lightning_4step_comfyui.safetensors"],
     "tier needs a animatediff_v2 or animatediff_v3"),
    ("lightning_quality_tiers", ["FlipbookLightningTierLoader.ckpt_name=none"], "No checkpoint chosen and no MODEL"),
])
def test_bad_inputs_of_the_tier_and_batch_nodes_are_one_line_and_write_nothing(issue10_models, tmp_path, capsys,
                                                                               workflow, overrides, match):
    out = tmp_path / "out"
    sets = [item for o in ["FlipbookLightningBatch.width=64", "FlipbookLightningBatch.height=64"] * (
        workflow == "lightning_seed_batch") + overrides for item in ("--set", o)]
    code = cli.main(["run", f"{workflow}.json", "--models", str(issue10_models), "--output-dir", str(out), *sets])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.rglob("*"))
