"""Wan 2.1 T2V at full size on a GPU: random weights in the real 14B (or 1.3B) layout and storage, written to
disk and loaded through Flipbook's loader, then 832x480x81 sampled with the lightx2v 4-step preset (CFG 1,
one forward per step) and decoded by a real-size Wan VAE. Reports seconds and peak VRAM per stage.

    python bench/gpu_wan.py                          # 14B fp8_e4m3fn, 832x480x81, 4 steps (needs ~15 GB disk)
    python bench/gpu_wan.py --storage fp8_scaled --nag
    python bench/gpu_wan.py --size tiny --device cpu --frames 5 --width 64 --height 64   # a smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning import load_pack  # noqa: E402

# (heads, layers, ffn) of the released models (wan/configs/wan_t2v_14B.py, wan_t2v_1_3B.py)
SIZES = {"14b": (40, 40, 13824), "1.3b": (12, 30, 8960), "tiny": (1, 2, 256)}


def write_random_wan(path: Path, *, size: str, storage: str, device: torch.device) -> Path:
    """Random weights (std 0.02, norms 1) under the original Wan names, made on `device` tensor by tensor."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    from flipbook_bench.wan_lora import tiny_transformer as T

    heads, layers, ffn = SIZES[size]
    sizes = T.TinyWanSizes(heads=heads, layers=layers, ffn=ffn, text_dim=4096)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanTransformer3DModel(**sizes.config()).state_dict().items()}
    names = T.original_key_names(layers)
    generator = torch.Generator(device=device).manual_seed(0)
    state = {}
    for original, renamed in zip(names, convert_wan_transformer_to_diffusers(dict.fromkeys(names))):
        shape = shapes[renamed]
        if "norm" in original and original.endswith("weight"):
            value = torch.ones(shape, device=device, dtype=torch.bfloat16)
        else:
            value = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02
        state[original] = value
    tensors, _ = T.quantize(state, storage)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
    return path


def lora_figures(W, model, request, folder: Path, size: str, device: torch.device) -> dict:
    """Apply a 14B-shaped rank-64 lightx2v-style LoRA (factors on every block Linear and the embeddings, diffs),
    swap its strength, and sample the same 4 steps with it."""
    from flipbook_bench.wan_lora import tiny_transformer as T
    from flipbook_bench.wan_lora.lora_apply import apply_lora_stack
    from flipbook_bench.wan_lora.tiny_loras import write_tiny_lora

    heads, layers, ffn = SIZES[size]
    sizes = T.TinyWanSizes(heads=heads, layers=layers, ffn=ffn, text_dim=4096)
    path, _ = write_tiny_lora(folder / "lightx2v_rank64.safetensors", fmt="lightx2v", sizes=sizes, rank=64)
    found = {"lora_file_gib": round(path.stat().st_size / 2**30, 2)}
    component = model.handle["transformer"]
    for name, strength in (("lora_apply_s", 1.0), ("lora_swap_s", 0.9)):
        patched = W.with_lora(model, path, strength=strength)
        _sync(device)
        start = time.perf_counter()
        apply_lora_stack(component, [(e.lora, e.strength) for e in patched.loras])
        _sync(device)
        found[name] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    W.sample_wan(patched, request)
    _sync(device)
    found["lora_sample_s"] = round(time.perf_counter() - start, 2)
    apply_lora_stack(component, [])
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default="14b")
    parser.add_argument("--storage", default="fp8_e4m3fn", choices=["fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "bf16"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--nag", action="store_true", help="NAG on (scale 11) with a 60-token negative")
    parser.add_argument("--lora", action="store_true", help="also: a 14B-shaped rank-64 lightx2v-style LoRA: "
                        "merge (apply) time, swap time, and 4 steps with it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default="/tmp/flipbook_gpu_wan")
    args = parser.parse_args()
    load_pack()
    from flipbook_bench.wan_lora import pipeline as W
    from flipbook_bench.wan_lora.nag import NagSettings
    from flipbook_bench.wan_lora.tiny_vae import write_tiny_wan_vae

    device = torch.device(args.device)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "storage": args.storage, "video": f"{args.width}x{args.height}x{args.frames}",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    start = time.perf_counter()
    path = write_random_wan(folder / f"wan_{args.size}_{args.storage}.safetensors", size=args.size,
                            storage=args.storage, device=device)
    report["write_s"] = round(time.perf_counter() - start, 1)
    report["file_gib"] = round(path.stat().st_size / 2**30, 2)
    start = time.perf_counter()
    model = W.load_wan_transformer(path, device=args.device)
    report["load_s"] = round(time.perf_counter() - start, 1)
    text_dim = model.layout.text_dim
    positive, negative = torch.zeros(1, 512, text_dim), torch.zeros(1, 512, text_dim)
    positive[:, :24], negative[:, :60] = torch.randn(1, 24, text_dim) * 0.1, torch.randn(1, 60, text_dim) * 0.1
    request = W.WanSampleRequest(positive=positive, negative=negative, frames=args.frames, width=args.width,
                                 height=args.height, steps=4, cfg=1.0, shift=5.0, sampler="euler",
                                 preset="lightx2v_4step", nag=NagSettings(scale=11.0 if args.nag else 1.0))
    for round_name in ("warmup", "sample"):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = W.sample_wan(model, request)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report[f"{round_name}_s"] = round(time.perf_counter() - start, 2)
    report["sample_peak_vram_gib"] = round(peak_gib(device), 2)
    report["weights_gib"] = round(model.handle["transformer"].size_bytes / 2**30, 2)
    report["forwards"] = result.model_forwards
    if args.lora:
        report.update(lora_figures(W, model, request, folder, args.size, device))
    model.handle["transformer"].offload()
    vae = W.load_wan_vae(write_tiny_wan_vae(folder / "wan_2.1_vae.safetensors", base_dim=96), device=args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    frames = W.decode_wan(vae, result.latents)
    report["decode_s"] = round(time.perf_counter() - start, 2)
    report["decode_peak_vram_gib"] = round(peak_gib(device), 2)
    report["frames"] = list(frames.shape)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
