"""Context windows' cost: sampling a clip longer than the PE window by window, / (windows x one pure 16-frame
UNet pass), side by side in one run; goal <= 1.05. A narrow SD1.5-shaped model (the lightning bench's small size).

    python bench/context_windows.py --frames 40 --res 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning import load_pack, timed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_pack()
    from flipbook_bench.core.context_windows import uniform_standard
    from flipbook_bench.core.schedules import sigma_to_timestep, sigmas_for_steps
    from flipbook_bench.lightning import pipeline as P
    from flipbook_bench.lightning import tiny_models as T

    sizes = T.TinySizes(unet_channels=(64, 128, 256, 256), vae_channels=(64, 128, 128, 128), vae_layers=2,
                        text_hidden=128, text_layers=4)
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = T.write_safetensors(T.tiny_sd15_state_dict(sizes), Path(scratch) / "sd15.safetensors")
        motion = T.write_safetensors(T.tiny_motion_state_dict(sizes),
                                     Path(scratch) / "animatediff_lightning_4step_comfyui.safetensors")
        model = P.load_lightning(ckpt, motion, device="cpu")
    device = model.device
    request = P.GenerationRequest(prompt="a fox running through snow", frames=args.frames, width=args.res,
                                  height=args.res, steps=4, seed=1, context_schedule="standard")
    windows = sum(len(uniform_standard(args.frames, 16, 4, step)) for step in range(4))
    h = args.res // 8
    x = torch.randn(1, 4, 16, h, h, dtype=model.dtype)
    ids = model.tokenizer("a fox", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = model.text_encoder(ids)[0].repeat_interleave(16, 0)
    sigmas, _ = sigmas_for_steps(model.model_sigmas, "trailing", 4)
    t = sigma_to_timestep(sigmas[:1], model.model_sigmas)

    def one_pass():
        with torch.no_grad():
            return model.unet(x, t, encoder_hidden_states=context).sample

    sampling, passes = [], []
    for _ in range(args.repeats + 1):  # the first round warms up
        result_t = timed(lambda: P.generate(model, request), device)[0]
        decode_t = timed(lambda: P.decode_latents(model.vae, torch.randn(args.frames, 4, h, h), model.scaling_factor,
                                                  chunk=P.DECODE_CHUNK, device=device), device)[0]
        text_t = timed(lambda: model.text_encoder(ids)[0], device)[0]
        sampling.append(result_t - decode_t - text_t)
        passes.append(timed(one_pass, device)[0])
    ours, one = statistics.median(sampling[1:]), statistics.median(passes[1:])
    sys.stdout.write(f"CPU, torch {torch.__version__}, {args.frames} frames at {args.res}px, 4 steps, standard windows "
                     f"16/4 ({windows} windows in all)\n(a) windowed sampling / (windows x one 16-frame pass) = "
                     f"{ours:.3f}s / ({windows} x {one:.3f}s) = {ours / (windows * one):.3f}  (goal <= 1.05)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
