"""Wan LoRA benchmark on a Wan-shaped model (head_dim 128), side by side in one run:

  (a) swapping the LoRA stack (style + distill -> another strength) / loading the model and reading every weight;
      goal <= 0.1
  (b) a forward with a rank-64 style LoRA + lightx2v-style distill LoRA / the same forward without; goal <= 1.01
  (c) how much of a LoRA's delta survives being merged into fp8 weights (requantized to e4m3fn with the layer's
      scale, round to nearest) — why Flipbook keeps the factors beside fp8 weights instead
Models are random, in the real file layouts, loaded through Flipbook's loaders.

    python bench/wan_lora.py                 # CPU: 2048 wide x 8 blocks, 81 frames at 256 px (5376 tokens)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning import load_pack, timed  # noqa: E402


def _forward_time(W, model, shape, text_dim, repeats) -> float:
    x = torch.randn(shape, dtype=model.dtype)
    context = torch.zeros(1, 512, text_dim, dtype=model.dtype)
    context[:, :20] = torch.randn(1, 20, text_dim, dtype=model.dtype)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            times.append(timed(lambda: model.transformer(hidden_states=x, timestep=torch.tensor([900.0]),
                                                         encoder_hidden_states=context, return_dict=False)[0],
                               model.device)[0])
    return statistics.median(times[1:])


def figure_c(T, L, sizes, scratch: Path) -> str:
    """How much of a LoRA delta survives requantization into the fp8 block weights (round to nearest, the
    layer's own scale), for deltas of 1% and 5% of the weight's norm (assumed typical for a style LoRA at
    strength 1 and a strong one): the part of the delta still in the weight, and the error against the exact
    merge, both relative to the delta."""
    from safetensors.torch import load_file

    fp8 = load_file(str(T.write_tiny_wan(scratch / "fp8.safetensors", storage="fp8_scaled", sizes=sizes)))
    _, plain = L.write_tiny_lora(scratch / "style64.safetensors", fmt="musubi", sizes=sizes, rank=64)
    found = []
    for relative in (0.01, 0.05):
        kept = error = total = 0.0
        for name, (_, up, down, factor) in plain.items():
            scale = fp8[name[: -len(".weight")] + ".scale_weight"].float()
            weight = fp8[name].float() * scale
            delta = factor * (up @ down)
            delta = delta * (relative * weight.norm() / delta.norm())
            requantized = ((weight + delta) / scale).to(torch.float8_e4m3fn).float() * scale
            kept += float(((requantized - weight) * delta).sum())
            error += float(((requantized - weight - delta) ** 2).sum())
            total += float((delta * delta).sum())
        found.append(f"{relative:.0%} delta: {kept / total:.0%} kept, error {(error / total) ** 0.5:.0%} of it")
    return ("(c) a LoRA merged into fp8 weights (requantized, round to nearest): " + "; ".join(found) +
            ". Kept beside the fp8 weight, the delta is applied exactly")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_pack()
    from flipbook_bench.wan_lora import pipeline as W
    from flipbook_bench.wan_lora import tiny_loras as L
    from flipbook_bench.wan_lora import tiny_transformer as T
    from flipbook_bench.wan_lora.lora_apply import apply_lora_stack

    sizes = T.TinyWanSizes(heads=args.heads, layers=args.layers, ffn=args.heads * 128 * 3, text_dim=4096)
    lines = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        path = T.write_tiny_wan(scratch / "wan.safetensors", storage="bf16", sizes=sizes)
        style, _ = L.write_tiny_lora(scratch / "style.safetensors", fmt="musubi", sizes=sizes, rank=args.rank)
        distill, _ = L.write_tiny_lora(scratch / "lightx2v.safetensors", fmt="lightx2v", sizes=sizes, rank=args.rank)

        def full_load():
            model = W.load_wan_transformer(path, device="cpu")
            sum(float(p.float().sum()) for p in model.transformer.parameters())  # every weight read
            return model

        load_t = statistics.median(timed(full_load, torch.device("cpu"))[0] for _ in range(args.repeats))
        model = full_load()
        stack = W.with_lora(W.with_lora(model, style, strength=1.0), distill, strength=0.9)
        other = W.with_lora(W.with_lora(model, style, strength=0.6), distill, strength=0.9)
        component = model.handle["transformer"]
        swaps = []
        for _ in range(args.repeats):
            apply_lora_stack(component, [(e.lora, e.strength) for e in stack.loras])
            start = time.perf_counter()
            apply_lora_stack(component, [(e.lora, e.strength) for e in other.loras])
            swaps.append(time.perf_counter() - start)
        swap_t = statistics.median(swaps)
        lines.append(f"(a) LoRA swap / full load = {swap_t:.3f}s / {load_t:.3f}s = {swap_t / load_t:.3f}  (goal <= 0.1; "
                     f"{args.heads * 128} wide x {args.layers} blocks, bf16, rank {args.rank} style + distill)")
        shape = W.latent_shape(frames=args.frames, width=args.res, height=args.res)
        plain_times, patched_times = [], []
        for _ in range(args.repeats):  # interleaved, so drifts of this shared machine hit both sides alike
            apply_lora_stack(component, [])
            plain_times.append(_forward_time(W, model, shape, 4096, 1))
            apply_lora_stack(component, [(e.lora, e.strength) for e in stack.loras])
            patched_times.append(_forward_time(W, model, shape, 4096, 1))
        plain_t, patched_t = statistics.median(plain_times), statistics.median(patched_times)
        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        lines.append(f"(b) forward with the LoRA stack / without = {patched_t:.3f}s / {plain_t:.3f}s = "
                     f"{patched_t / plain_t:.3f}  (goal <= 1.01; {tokens} tokens, {args.heads * 128} wide x "
                     f"{args.layers} blocks)")
        lines.append(figure_c(T, L, sizes, scratch))
    sys.stdout.write(f"CPU, torch {torch.__version__}\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
