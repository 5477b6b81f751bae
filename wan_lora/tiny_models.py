"""The three tiny Wan stand-ins a workflow needs, under the file names it references, in ComfyUI's folders
(`flipbook demo wan`, the workflow tests, the benchmarks). Each file is in the real file's key layout and,
where the name says so, its storage (fp8_e4m3fn, fp8_scaled, bf16, fp16)."""
from __future__ import annotations

from pathlib import Path

from .tiny_loras import FORMATS as LORA_FORMATS
from .tiny_loras import write_tiny_lora
from .tiny_transformer import write_tiny_wan
from .tiny_umt5 import write_tiny_umt5
from .tiny_vae import write_tiny_wan_vae

# storage by file name, most specific first (ComfyUI's repackaged names: *_fp8_e4m3fn_scaled, *_fp8_scaled, ...)
_TRANSFORMER_STORAGES = (("fp8_scaled", "fp8_scaled"), ("fp8_e4m3fn", "fp8_e4m3fn"), ("fp8_e5m2", "fp8_e5m2"),
                         ("fp16", "fp16"), ("bf16", "bf16"))
_TEXT_STORAGES = (("scaled", "fp8_scaled"), ("fp8_e4m3fn", "fp8_e4m3fn"), ("bf16", "bf16"), ("fp16", "fp16"))


def storage_for(name: str, table: tuple[tuple[str, str], ...], default: str) -> str:
    lowered = name.lower()
    return next((storage for marker, storage in table if marker in lowered), default)


def write_wan_demo_loras(models_dir: Path, names: list[str]) -> list[Path]:
    """loras/: the workflow's LoRAs (a name saying lightx2v/distill gets a lightx2v-layout stand-in, any other a
    musubi-tuner one with the Studio Ghibli trigger in its metadata) and one tiny LoRA in every other format."""
    written = []
    for name in names:
        distill = any(word in name.lower() for word in ("lightx2v", "distill"))
        written.append(write_tiny_lora(models_dir / "loras" / name, fmt="lightx2v" if distill else "musubi",
                                       trigger=None if distill else "Studio Ghibli style.", seed=len(written) + 1)[0])
    for fmt in LORA_FORMATS:
        written.append(write_tiny_lora(models_dir / "loras" / f"tiny_wan_lora_{fmt}.safetensors", fmt=fmt)[0])
    return written


def write_wan_demo_models(models_dir: Path, *, transformer: str, text_encoder: str, vae: str,
                          loras: tuple[str, ...] = ()) -> list[Path]:
    """diffusion_models/<transformer>, text_encoders/<text_encoder>, vae/<vae>, loras/ under `models_dir`."""
    return [*write_wan_demo_loras(models_dir, list(loras)), 
        write_tiny_wan(models_dir / "diffusion_models" / transformer,
                       storage=storage_for(transformer, _TRANSFORMER_STORAGES, "bf16")),
        write_tiny_umt5(models_dir / "text_encoders" / text_encoder,
                        storage=storage_for(text_encoder, _TEXT_STORAGES, "fp16")),
        write_tiny_wan_vae(models_dir / "vae" / vae),
    ]
