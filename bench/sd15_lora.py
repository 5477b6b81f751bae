"""SD1.5 image + motion LoRAs: the motion UNet's forward with a LoRA stack applied / without, side by side in one
run (alternating rounds); goal <= 1.01. The deltas are merged into the weights, so the two should be the same
kernels on the same shapes. A narrow SD1.5-shaped model (the lightning bench's small size), 16 frames.

    python bench/sd15_lora.py --res 128 --rank 32
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
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_pack()
    from flipbook_bench.lightning import pipeline as P
    from flipbook_bench.lightning import tiny_models as T
    from flipbook_bench.lightning.motion_lora import apply_motion_loras, with_motion_lora
    from flipbook_bench.lightning.sd15_lora import apply_sd15_loras, with_sd15_lora

    sizes = T.TinySizes(unet_channels=(64, 128, 256, 256), vae_channels=(64, 128, 128, 128), vae_layers=2,
                        text_hidden=128, text_layers=4)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        ckpt = T.write_safetensors(T.tiny_sd15_state_dict(sizes), root / "sd15.safetensors")
        motion_state = T.tiny_motion_state_dict(sizes)
        motion = T.write_safetensors(motion_state, root / "animatediff_lightning_4step_comfyui.safetensors")
        model = P.load_lightning(ckpt, motion, device="cpu")
        image_lora, _ = T.tiny_kohya_lora(model.unet, model.text_encoder, rank=args.rank, locon=True)
        camera, _ = T.tiny_motion_lora(motion_state, rank=args.rank)
        patched = with_motion_lora(with_sd15_lora(model, T.write_safetensors(image_lora, root / "style.safetensors"),
                                                  strength=0.8),
                                   T.write_safetensors(camera, root / "v2_lora_ZoomIn.safetensors"), strength=0.75)
    unet = model.handle["unet"]
    h = args.res // 8
    x = torch.randn(1, 4, 16, h, h, dtype=model.dtype)
    context = torch.randn(16, 77, sizes.text_hidden, dtype=model.dtype)
    t = torch.tensor(999.0)

    def forward(stack_of):
        apply_sd15_loras(unet, stack_of.loras)
        apply_motion_loras(unet, stack_of.motion_loras)
        return timed(lambda: model.unet(x, t, encoder_hidden_states=context).sample, model.device)[0]

    plain, with_lora = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            plain.append(forward(model))
            with_lora.append(forward(patched))
    a, b = statistics.median(with_lora[1:]), statistics.median(plain[1:])
    sys.stdout.write(f"CPU, torch {torch.__version__}, 16 frames at {args.res}px, image LoRA (LoCon) + motion LoRA, "
                     f"rank {args.rank}\n(a) LoRA forward / plain forward = {a:.3f}s / {b:.3f}s = {a / b:.3f}  "
                     "(goal <= 1.01)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
