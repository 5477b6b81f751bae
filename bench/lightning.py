"""AnimateDiff-Lightning benchmark: overhead over pure model time, denoiser calls, and speed vs diffusers.

Prints, side by side in one run:
  (a) end-to-end time / sum of pure model forward times (text encoder + UNet x steps + VAE decode); goal <= 1.05
  (b) denoiser evaluations of the 4-step variant at CFG 1; must be exactly 4
  (c) our end-to-end time / diffusers AnimateDiffPipeline on the same components, with the max pixel
      difference between the two outputs; goal <= 1.0
Models are random, written in the real single-file layouts and loaded through Flipbook's loaders.
`--size real` uses SD1.5's real widths (GPU); `--size small` a narrow SD1.5-shaped model (CPU).

    python bench/lightning.py --size small --frames 16 --res 128        # CPU
    python bench/lightning.py --size real --frames 16 --res 512          # GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_pack():
    spec = importlib.util.spec_from_file_location("flipbook_bench", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["flipbook_bench"] = module
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def pure_model_time(P, model, request, device) -> float:
    """Text encoder + UNet x steps + VAE decode, each called directly on ready inputs."""
    from flipbook_bench.core.schedules import sigma_to_timestep, sigmas_for_steps

    frames, h, w = request.frames, request.height // 8, request.width // 8
    sigmas, _ = sigmas_for_steps(model.model_sigmas, request.scheduler, request.steps)
    ids = model.tokenizer(request.prompt, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids.to(device)
    x = torch.randn(1, 4, frames, h, w, device=device, dtype=model.dtype)
    latents = torch.randn(frames, 4, h, w, device=device, dtype=model.dtype)
    total = 0.0
    with torch.no_grad():
        t_text, context = timed(lambda: model.text_encoder(ids)[0], device)
        total += t_text
        context = context.repeat_interleave(frames, dim=0)
        for sigma in sigmas[:-1]:
            t = sigma_to_timestep(sigma.reshape(1), model.model_sigmas).to(device)
            total += timed(lambda: model.unet(x, t, encoder_hidden_states=context).sample, device)[0]
        for start in range(0, frames, 8):
            total += timed(lambda: model.vae.decode(latents[start:start + 8]).sample, device)[0]
    return total


def diffusers_run(P, model, request, device):
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing="trailing")
    pipe = AnimateDiffPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                               unet=model.unet, motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = P.seeded_noise((1, 4, request.frames, request.height // 8, request.width // 8), request.seed)
    # the same x_T on both sides: diffusers multiplies given latents by init_noise_sigma (sigma_max for trailing)
    sigmas, _ = P.sigmas_for_steps(model.model_sigmas, request.scheduler, request.steps)
    start = P.initial_latent(noise, sigmas[0], P.epsilon_prediction(model.model_sigmas)) / scheduler.init_noise_sigma

    def run():
        with torch.no_grad():
            return pipe(prompt=request.prompt, num_frames=request.frames, height=request.height, width=request.width,
                        num_inference_steps=request.steps, guidance_scale=1.0, decode_chunk_size=8,
                        latents=start.to(device, model.dtype), output_type="pt").frames[0].cpu()
    # .cpu(): ComfyUI IMAGE tensors live on the CPU, so both sides pay the same transfer

    return run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["small", "real"], default="small")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_pack()
    from flipbook_bench.lightning import pipeline as P
    from flipbook_bench.lightning import tiny_models as T

    sizes = T.SD15_REAL_SIZES if args.size == "real" else T.TinySizes(
        unet_channels=(64, 128, 256, 256), vae_channels=(64, 128, 128, 128), vae_layers=2, text_hidden=128,
        text_layers=4)
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = T.write_safetensors(T.tiny_sd15_state_dict(sizes), Path(scratch) / "sd15.safetensors")
        motion = T.write_safetensors(T.tiny_motion_state_dict(sizes),
                                     Path(scratch) / "animatediff_lightning_4step_comfyui.safetensors")
        t_load, model = timed(lambda: P.load_lightning(ckpt, motion), torch.device("cpu"))
    device = model.device
    request = P.GenerationRequest(prompt="a fox running through snow", frames=args.frames, width=args.res,
                                  height=args.res, steps=4, seed=1)
    theirs_fn = diffusers_run(P, model, request, device)
    unet_calls = [0]
    model.unet.register_forward_pre_hook(lambda *_: unet_calls.__setitem__(0, unet_calls[0] + 1))
    ours_t, theirs_t, pure_t = [], [], []
    for _ in range(args.repeats + 1):  # first round is warm-up
        unet_calls[0] = 0
        t, result = timed(lambda: P.generate(model, request), device)
        ours_t.append(t)
        calls = (result.denoiser_calls, unet_calls[0])
        t, theirs = timed(theirs_fn, device)
        theirs_t.append(t)
        pure_t.append(pure_model_time(P, model, request, device))
    ours, diff, pure = (statistics.median(v[1:]) for v in (ours_t, theirs_t, pure_t))
    max_diff = float((result.frames.permute(0, 3, 1, 2) - theirs.float().cpu()).abs().max())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    lines = [
        f"device {name}, dtype {model.dtype}, size {args.size} (UNet+motion {params:.0f}M params), "
        f"{args.frames} frames at {args.res}px, 4 steps, cfg 1, load {t_load:.1f}s",
        f"(a) end-to-end / pure model time = {ours:.3f}s / {pure:.3f}s = {ours / pure:.3f}  (goal <= 1.05)",
        f"(b) denoiser evaluations = {calls[0]}, UNet forwards = {calls[1]}  (must be 4)",
        f"(c) ours / diffusers AnimateDiffPipeline = {ours:.3f}s / {diff:.3f}s = {ours / diff:.3f}  (goal <= 1.0); "
        f"max |pixel diff| = {max_diff:.2e}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
