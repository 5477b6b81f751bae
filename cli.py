"""`flipbook` command line: a demo on tiny models, running bundled workflows headless, inspecting files."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .core.media.writers import FORMATS

PACK_DIR = Path(__file__).resolve().parent
WORKFLOWS = PACK_DIR / "workflows"
DEMO_WORKFLOW = WORKFLOWS / "lightning_4step_t2v.json"
WAN_DEMO_WORKFLOW = WORKFLOWS / "wan21_t2v_14b_style_lora_lightx2v.json"
# tiny models are tiny in width too: the demos sample 64 px (Wan: 17 frames) so they finish in seconds on a CPU
DEMO_OVERRIDES = ("FlipbookLightningSampler.width=64", "FlipbookLightningSampler.height=64")
WAN_DEMO_OVERRIDES = ("FlipbookWanSampler.resolution=custom (width x height below)", "FlipbookWanSampler.width=64",
                      "FlipbookWanSampler.height=64", "FlipbookWanSampler.frames=17")


def _widget(workflow: dict, node_type: str, index: int = 0):
    return next(n for n in workflow["nodes"] if n["type"] == node_type)["widgets_values"][index]


def write_demo_models(models_dir: Path, workflow: dict) -> list[Path]:
    """Tiny random checkpoints, motion modules, LoRAs and input clips under the names the workflow uses."""
    from .lightning.tiny_workflow_models import write_lightning_workflow_models

    return write_lightning_workflow_models(models_dir, workflow, input_dir=models_dir.parent / "input")


def write_wan_demo_models(models_dir: Path, workflow: dict) -> list[Path]:
    """Tiny Wan transformer, umt5 (with an embedded sentencepiece model), VAE and LoRAs under the workflow's names."""
    from .wan_lora.tiny_models import write_wan_demo_models as write

    loras = tuple(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "FlipbookWanLoraLoader")
    return write(models_dir, transformer=_widget(workflow, "FlipbookWanModelLoader"),
                 text_encoder=_widget(workflow, "FlipbookWanTextEncoderLoader"),
                 vae=_widget(workflow, "FlipbookWanVAELoader"), loras=loras)


# every bundled Lightning workflow made of Flipbook nodes only runs as a demo too (`flipbook demo lightning_vid2vid`)
HEADLESS_LIGHTNING = ("lightning_4step_lora_motion_lora", "lightning_vid2vid", "lightning_64frames_context_windows",
                      "lightning_quality_tiers", "lightning_seed_batch")
DEMOS = {"lightning": (DEMO_WORKFLOW, write_demo_models, DEMO_OVERRIDES),
         "wan": (WAN_DEMO_WORKFLOW, write_wan_demo_models, WAN_DEMO_OVERRIDES),
         **{name: (WORKFLOWS / f"{name}.json", write_demo_models, DEMO_OVERRIDES) for name in HEADLESS_LIGHTNING}}
SIZED_NODES = ("FlipbookLightningSampler", "FlipbookLightningBatch", "FlipbookWanSampler")


def run_workflow(path: Path, models_dir: Path, output_dir: Path, overrides: Sequence[str],
                 input_dir: Optional[Path] = None) -> list[Path]:
    """Run a UI-format workflow with our nodes; returns the files the output nodes wrote. `input_dir`: ComfyUI's
    input folder (Load Video's files); default: `input` beside the models folder."""
    from .nodes import NODE_CLASS_MAPPINGS, _comfy
    from .core.errors import WorkflowError
    from .nodes.headless import apply_overrides, run_prompt, validate_prompt, workflow_to_prompt

    data = json.loads(path.read_text())
    api_format = isinstance(data, dict) and "nodes" not in data and data and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())
    workflow = None if api_format else data
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=models_dir, output_dir=output_dir,
                                            input_dir=input_dir or models_dir.parent / "input"))
    try:
        prompt = dict(data) if api_format else workflow_to_prompt(data, NODE_CLASS_MAPPINGS)
        unknown = sorted({v["class_type"] for v in prompt.values()} - set(NODE_CLASS_MAPPINGS))
        if unknown:
            raise WorkflowError(f"Headless runs know only Flipbook nodes; this prompt uses {', '.join(unknown)}.")
        apply_overrides(prompt, list(overrides), NODE_CLASS_MAPPINGS)
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)
        ui = run_prompt(prompt, NODE_CLASS_MAPPINGS, workflow=workflow)
    finally:
        _comfy.use_headless(None)
    for out in ui.values():
        for note in out.get("flipbook_notes", []):
            logging.warning("%s", note)
    return [output_dir / i["subfolder"] / i["filename"] for out in ui.values() for i in out.get("images", [])]


def _demo(args: argparse.Namespace) -> int:
    workflow_path, write_models, demo_overrides = DEMOS[args.path]
    workflow = json.loads(workflow_path.read_text())
    with tempfile.TemporaryDirectory(prefix="flipbook-demo-") as scratch:
        models_dir = Path(args.models_dir) if args.models_dir else Path(scratch) / "models"
        output_dir = Path(args.output_dir) if args.output_dir else Path.cwd() / "output"
        for written in write_models(models_dir, workflow):
            logging.info("wrote tiny model %s", written)
        present = {n["type"] for n in workflow["nodes"]}
        # the size overrides name their node type: keep those of the nodes this workflow has
        overrides = [o for o in demo_overrides if o.split(".")[0] in present or o.split(".")[0] not in SIZED_NODES]
        if "FlipbookLightningBatch" in present:
            overrides += ["FlipbookLightningBatch.width=64", "FlipbookLightningBatch.height=64",
                          f"FlipbookLightningBatch.format={args.format}"]
        if "FlipbookSaveVideo" in present:
            overrides.append(f"FlipbookSaveVideo.format={args.format}")
        files = run_workflow(workflow_path, models_dir, output_dir, overrides)
    sys.stdout.write("".join(f"{f}\n" for f in files))
    return 0


def _run(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir) if args.output_dir else Path.cwd() / "output"
    path = Path(args.workflow)
    if not path.is_file() and (WORKFLOWS / args.workflow).is_file():
        path = WORKFLOWS / args.workflow
    files = run_workflow(path, Path(args.models), output_dir, args.set or [],
                         input_dir=Path(args.input_dir) if args.input_dir else None)
    sys.stdout.write("".join(f"{f}\n" for f in files))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .core.media.readers import read_workflow

    found = read_workflow(args.file)
    summary = {k: (f"{len(v.get('nodes', []))} nodes" if k == "workflow" else f"{len(v)} entries")
               for k, v in found.items()}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0 if found else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flipbook", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a bundled workflow on tiny random models (no downloads)")
    demo.add_argument("path", choices=list(DEMOS))
    demo.add_argument("--models-dir", help="keep the tiny models here (ComfyUI models/ layout)")
    demo.add_argument("--output-dir", help="where the video goes (default ./output)")
    demo.add_argument("--format", choices=list(FORMATS), default="mp4", help="output format (default mp4)")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run a workflow JSON (UI format) headless on real models")
    run.add_argument("workflow")
    run.add_argument("--models", required=True, help="ComfyUI models/ folder (checkpoints/, animatediff_models/, "
                     "diffusion_models/, text_encoders/, vae/)")
    run.add_argument("--output-dir")
    run.add_argument("--input-dir", help="ComfyUI input/ folder (Load Video's files; default: input/ beside --models)")
    run.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE")
    run.set_defaults(func=_run)
    inspect = sub.add_parser("inspect", help="show the workflow/prompt ComfyUI would restore from a saved file")
    inspect.add_argument("file")
    inspect.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .core.errors import FlipbookError

    try:
        return args.func(args)
    except (FlipbookError, OSError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"flipbook: {exc}\n")  # typed errors already say what to do; no traceback
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("flipbook: interrupted; nothing was saved from the unfinished run\n")
        return 130  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    raise SystemExit(main())
