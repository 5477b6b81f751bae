"""Wan 2.1 benchmark on a small Wan-shaped model (head_dim 128), side by side in one run:

  (a) sampling time / pure transformer forwards (same inputs, same count); goal <= 1.05
  (b) a NAG step / a plain CFG-1 step (the extra attention over the negative text), at 81 frames; goal <= 1.05
  (c) peak RSS over the baseline, fp8 file / bf16 file (load + one forward, each in its own process); goal <= 0.55
  (d) ours / diffusers WanPipeline (UniPC, CFG 5, VAE decode) on the same weights, with diffusers' conventions
      patched in so the outputs match (integer t, its sigmas, start = noise), and the max pixel difference; goal <= 1.0
Models are random, written in the real file layouts and loaded through Flipbook's loaders.

    python bench/wan.py                     # CPU defaults: dim 512, 4 blocks, 17 frames at 256x256 (1280 tokens)
    python bench/wan.py --rss-only          # just (c)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning import load_pack, sync, timed  # noqa: E402  (the same pack loader and timers)

ROOT = Path(__file__).resolve().parent.parent


def _sizes(T, args):
    return T.TinyWanSizes(heads=args.heads, layers=args.layers, ffn=args.ffn, text_dim=args.text_dim)


def _context(text_dim: int, tokens: int, seed: int) -> torch.Tensor:
    context = torch.zeros(1, 512, text_dim)
    context[:, :tokens] = torch.randn(1, tokens, text_dim, generator=torch.Generator().manual_seed(seed))
    return context


def _request(W, args, **overrides):
    base = dict(positive=_context(args.text_dim, 24, 1), negative=_context(args.text_dim, 60, 2), seed=3,
                frames=args.frames, width=args.res, height=args.res, steps=args.steps, cfg=1.0, shift=5.0,
                sampler="euler", preset="custom")
    return W.WanSampleRequest(**{**base, **overrides})


def pure_forwards(W, model, request) -> float:
    """The transformer called directly, once per step, on ready inputs."""
    shape = W.latent_shape(frames=request.frames, width=request.width, height=request.height)
    x = torch.randn(shape, dtype=model.dtype, device=model.device)
    context = request.positive.to(model.device, model.dtype)
    total = 0.0
    with torch.no_grad():
        for sigma in W.FLOW_SCHEDULES[request.sampler](request.steps, request.shift)[:-1]:
            t = (sigma * 1000).reshape(1).to(model.device)
            total += timed(lambda: model.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                                     return_dict=False)[0], model.device)[0]
    return total


def figure_a(W, model, args) -> str:
    plain = _request(W, args)
    ours, pure = [], []
    for _ in range(args.repeats + 1):  # the first round warms up
        ours.append(timed(lambda: W.sample_wan(model, plain), model.device)[0])
        pure.append(pure_forwards(W, model, plain))
    ours_t, pure_t = (statistics.median(v[1:]) for v in (ours, pure))
    return f"(a) sampling / pure forwards = {ours_t:.3f}s / {pure_t:.3f}s = {ours_t / pure_t:.3f}  (goal <= 1.05)"


def figure_b(W, model, args) -> str:
    """At a Wan-like ratio of video to text tokens (81 frames: 21 latent frames), where NAG's extra attention
    over the 512 negative tokens is as small a part of a block as in the real model (less at 480p)."""
    from flipbook_bench.wan_lora.nag import NagSettings

    sized = dict(frames=args.nag_frames, width=args.nag_res, height=args.nag_res, steps=args.nag_steps)
    plain, nag = _request(W, args, **sized), _request(W, args, nag=NagSettings(), **sized)
    plain_t, nag_t = [], []
    for _ in range(args.repeats + 1):
        plain_t.append(timed(lambda: W.sample_wan(model, plain), model.device)[0])
        nag_t.append(timed(lambda: W.sample_wan(model, nag), model.device)[0])
    plain_m, nag_m = (statistics.median(v[1:]) for v in (plain_t, nag_t))
    shape = W.latent_shape(frames=args.nag_frames, width=args.nag_res, height=args.nag_res)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    return (f"(b) NAG step / CFG-1 step = {nag_m / args.nag_steps:.3f}s / {plain_m / args.nag_steps:.3f}s = "
            f"{nag_m / plain_m:.3f}  (goal <= 1.05; {args.nag_frames} frames at {args.nag_res}px = {tokens} tokens; "
            f"480p x 81 frames has 32760)")


def figure_d(W, model, vae, args) -> str:
    """Ours against diffusers' WanPipeline with the same transformer, VAE, embeddings and noise."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from flipbook_bench.core import denoisers

    def scheduler():
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                       solver_order=2, solver_type="bh2", lower_order_final=True,
                                       final_sigmas_type="zero")

    request = _request(W, args, cfg=5.0, sampler="unipc")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.handle["vae"].module,
                       transformer=model.transformer, scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    start = W.seeded_noise(W.latent_shape(frames=args.frames, width=args.res, height=args.res), 3)
    reference = scheduler()
    reference.set_timesteps(args.steps)
    W.flow_prediction = lambda: denoisers.Parameterization(  # diffusers' conventions, so both outputs match
        name="flow", input_scale=lambda s: 1.0, timestep=lambda s: (s * 1000).to(torch.int64).float(),
        initial_scale=lambda s: 1.0)
    W.FLOW_SCHEDULES = {"unipc": lambda steps, shift: reference.sigmas.float()}

    def theirs_run():
        with torch.no_grad():
            video = pipe(prompt_embeds=request.positive, negative_prompt_embeds=request.negative, guidance_scale=5.0,
                         num_inference_steps=args.steps, num_frames=args.frames, height=args.res, width=args.res,
                         latents=start.clone(), output_type="pt").frames[0]
        return video.permute(0, 2, 3, 1).float().cpu()  # [F, H, W, 3], as IMAGE

    def ours_run():
        return W.decode_wan(vae, W.sample_wan(model, request).latents)

    ours_t, theirs_t = [], []
    for _ in range(args.repeats + 1):
        t, ours = timed(ours_run, model.device)
        ours_t.append(t)
        t, theirs = timed(theirs_run, model.device)
        theirs_t.append(t)
    ours_m, theirs_m = statistics.median(ours_t[1:]), statistics.median(theirs_t[1:])
    diff = float((ours - theirs).abs().max())
    return (f"(d) ours / diffusers WanPipeline (UniPC, CFG 5, decode) = {ours_m:.3f}s / {theirs_m:.3f}s = "
            f"{ours_m / theirs_m:.3f}  (goal <= 1.0); max |pixel diff| = {diff:.2e}")


def _status_kib(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def rss_child(path: str, frames: int, res: int, text_dim: int) -> None:
    """In a fresh process: peak RSS over the baseline for loading `path` (bf16 compute) and one forward (Linux)."""
    load_pack()
    from diffusers import WanTransformer3DModel  # noqa: F401  (imports are the baseline, not the model)
    from diffusers.loaders import single_file_utils  # noqa: F401
    from diffusers.models import attention_dispatch  # noqa: F401

    from flipbook_bench.wan_lora import pipeline as W

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: imports peak higher than a load
    baseline = _status_kib("VmRSS")
    model = W.load_wan_transformer(path, device="cpu", dtype=torch.bfloat16)
    shape = W.latent_shape(frames=frames, width=res, height=res)
    with torch.no_grad():
        model.transformer(hidden_states=torch.randn(shape, dtype=torch.bfloat16), timestep=torch.tensor([900.0]),
                          encoder_hidden_states=torch.zeros(1, 512, text_dim, dtype=torch.bfloat16))
    peak = _status_kib("VmHWM")
    sys.stdout.write(json.dumps({"delta_kib": peak - baseline, "bytes": model.handle["transformer"].size_bytes}))


def figure_c(T, args, scratch: Path) -> str:
    sizes = T.TinyWanSizes(heads=args.rss_heads, layers=args.rss_layers, ffn=args.rss_heads * 128 * 4,
                           text_dim=args.text_dim)
    found = {}
    for storage in ("bf16", "fp8_e4m3fn"):
        path = T.write_tiny_wan(scratch / f"rss_{storage}.safetensors", storage=storage, sizes=sizes)
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--frames", "5", "--res", "64",
                              "--text-dim", str(args.text_dim)], capture_output=True, text=True, check=True)
        found[storage] = json.loads(out.stdout)
    ratio = found["fp8_e4m3fn"]["delta_kib"] / found["bf16"]["delta_kib"]
    return (f"(c) peak RSS over baseline, fp8 / bf16 = {found['fp8_e4m3fn']['delta_kib'] / 1024:.0f} MiB / "
            f"{found['bf16']['delta_kib'] / 1024:.0f} MiB = {ratio:.3f}  (goal <= 0.55; "
            f"{args.rss_heads * 128} wide x {args.rss_layers} blocks, weights "
            f"{found['fp8_e4m3fn']['bytes'] / 2**20:.0f} vs {found['bf16']['bytes'] / 2**20:.0f} MiB)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nag-frames", type=int, default=81)
    parser.add_argument("--nag-res", type=int, default=256)
    parser.add_argument("--nag-steps", type=int, default=3)
    parser.add_argument("--rss-heads", type=int, default=8)
    parser.add_argument("--rss-layers", type=int, default=40)
    parser.add_argument("--rss-only", action="store_true")
    parser.add_argument("--rss-child")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.frames, args.res, args.text_dim)
        return 0
    load_pack()
    from flipbook_bench.wan_lora import pipeline as W
    from flipbook_bench.wan_lora import tiny_transformer as T
    from flipbook_bench.wan_lora.tiny_vae import write_tiny_wan_vae

    with tempfile.TemporaryDirectory() as scratch:
        lines = [figure_c(T, args, Path(scratch))]
        if not args.rss_only:
            path = T.write_tiny_wan(Path(scratch) / "wan.safetensors", storage="bf16", sizes=_sizes(T, args))
            model = W.load_wan_transformer(path, device="cpu")
            vae = W.load_wan_vae(write_tiny_wan_vae(Path(scratch) / "vae.safetensors", base_dim=16), device="cpu")
            tokens = W.latent_shape(frames=args.frames, width=args.res, height=args.res)
            lines.insert(0, f"device {'CPU' if model.device.type == 'cpu' else torch.cuda.get_device_name()}, "
                            f"{model.dtype}, dim {args.heads * 128} x {args.layers} blocks, {args.frames} frames at "
                            f"{args.res}px ({tokens[2] * (tokens[3] // 2) * (tokens[4] // 2)} tokens), "
                            f"{args.steps} steps, torch {torch.__version__}")
            lines[1:1] = [figure_a(W, model, args), figure_b(W, model, args)]
            lines.append(figure_d(W, model, vae, args))
    sync(torch.device("cpu"))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
