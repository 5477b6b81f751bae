"""A tiny random umt5 text encoder in the exact key layout of ComfyUI's `umt5_xxl_*.safetensors`.

Used by the tests (and later benchmarks / `flipbook demo`): HF T5 names, bare, a relative-position
bias in every block (UMT5), the sentencepiece tokenizer embedded as the uint8 tensor `spiece_model`,
and each storage the real files come in (fp16, fp8_e4m3fn_scaled in the legacy `scale_weight` and the
newer `weight_scale` + `comfy_quant` spellings). Only the sizes are small. Variants that real users
pick by mistake (no tokenizer, a T5 v1.1 XXL from Flux/SD3, Wan's own Wan-native names) are here too,
so the refusals are tested on files shaped like the real ones.
"""
from __future__ import annotations

import functools
import io
import json
import re
from pathlib import Path
from types import MappingProxyType

import torch

from ..core.tiny_weights import randomize

# widths of the tiny encoder; heads * d_kv (16) differs from d_model (32) as it may in T5, so the loader
# cannot get away with assuming d_kv = d_model / heads
TINY_UMT5_SIZES = MappingProxyType({"d_model": 32, "d_kv": 8, "num_heads": 2, "num_layers": 2, "d_ff": 48,
                                    "relative_attention_num_buckets": 32})
STORAGES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_scaled", "fp8_scaled_new")
LAYOUTS = ("comfy", "t5_v1_1", "wan")
LINEAR_NAMES = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
FP8_MAX = 448.0  # largest finite float8_e4m3fn value

# The default Wan negative prompt (wan/configs/shared_config.py) and the README's English version, plus a few
# prompt-like sentences: the tokenizer is trained on these, so both scripts get real pieces.
TRAINING_TEXT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards",
    "A red cat walks slowly across the green grass in the morning light, cinematic, realistic.",
    "一只红色的猫在清晨的阳光下慢慢走过绿色的草地，电影感，写实风格。",
    "Studio Ghibli style, a girl rides a bicycle by the sea, soft clouds, 吉卜力风格，女孩在海边骑自行车。",
)


@functools.lru_cache(maxsize=1)
def tiny_spiece_model() -> bytes:
    """A small unigram sentencepiece model with umt5's special ids (pad 0, eos 1, unk 2, no bos), trained
    in memory from TRAINING_TEXT; one thread and no sampling, so the same bytes every time."""
    import sentencepiece

    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 3), model_writer=writer, model_type="unigram", vocab_size=200,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return writer.getvalue()


def _spiece_tensor(model_proto: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(model_proto), dtype=torch.uint8).clone()


def tiny_umt5_config(vocab_size: int) -> dict:
    """transformers UMT5Config values of the tiny encoder (the defaults of the real umt5-xxl otherwise)."""
    return {"vocab_size": vocab_size, **TINY_UMT5_SIZES, "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6, "relative_attention_max_distance": 128}


def _random_encoder_state(seed: int) -> dict[str, torch.Tensor]:
    """Full-precision tensors under UMT5EncoderModel names (one copy of the tied embedding, as `shared`)."""
    import sentencepiece
    from transformers import UMT5Config, UMT5EncoderModel

    vocab = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece_model()).vocab_size()
    model = UMT5EncoderModel(UMT5Config(**tiny_umt5_config(vocab)))
    randomize(model, seed)
    state = model.state_dict()
    state.pop("encoder.embed_tokens.weight")  # tied to shared.weight
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def _is_linear(key: str) -> bool:
    return key.endswith(tuple(f"{name}.weight" for name in LINEAR_NAMES))


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _stored(state: dict[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """The tensors as a file of that storage holds them."""
    plain = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if storage in plain:
        return {k: v.to(plain[storage]) for k, v in state.items()}
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, not {storage!r}")
    fp8 = torch.float8_e4m3fn
    # Guess (the real files' per-key dtypes are not in our reference): Linear weights in fp8, the embedding,
    # norms and relative-position biases in fp16, as ComfyUI's scaled files keep non-Linear tensors unscaled.
    out = {k: v.to(torch.float16) for k, v in state.items() if not _is_linear(k)}
    for key, weight in ((k, v) for k, v in state.items() if _is_linear(k)):
        if storage == "fp8_e4m3fn":
            out[key] = weight.to(fp8)
            continue
        scale = (weight.abs().amax() / FP8_MAX).float()  # about 1e-3 here, as in the real files
        out[key] = (weight / scale).to(fp8)
        base = key.removesuffix(".weight")
        if storage == "fp8_scaled":
            out[base + ".scale_weight"] = scale.reshape(())
        else:
            out[base + ".weight_scale"] = scale.reshape(())
            out[base + ".comfy_quant"] = _comfy_quant("float8_e4m3fn")
    if storage == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)  # the marker: its dtype names the fp8 format
    return out


# HF T5 name -> Wan-native name (wan/modules/t5.py module names, as in models_t5_umt5-xxl-enc-bf16.pth)
_WAN_NAMES = (
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
)


def _wan_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = next((re.sub(pattern, repl, key) for pattern, repl in _WAN_NAMES if re.match(pattern, key)), None)
        if new is None:
            raise KeyError(f"no Wan-native name for {key}")
        out[new] = value
    return out


def tiny_umt5_state_dict(*, storage: str = "fp16", with_tokenizer: bool = True, seed: int = 0,
                         layout: str = "comfy", with_embed_tokens: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a tiny umt5 file. layout 'comfy' (ComfyUI's umt5_xxl files), 't5_v1_1' (Flux/SD3's
    t5xxl: relative bias in block 0 only) or 'wan' (Wan's .pth names, which never carry a tokenizer).
    `with_embed_tokens` also writes the tied `encoder.embed_tokens.weight` copy some exports have."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    state = _random_encoder_state(seed)
    if layout == "t5_v1_1":
        state = {k: v for k, v in state.items()
                 if not (k.endswith("relative_attention_bias.weight") and not k.startswith("encoder.block.0."))}
    if with_embed_tokens:
        state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    if layout == "wan":
        if storage not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"layout 'wan' is written in fp32, fp16 or bf16 (Wan ships bf16), not {storage!r}")
        return _wan_native(_stored(state, storage))
    out = _stored(state, storage)
    if with_tokenizer:
        out["spiece_model"] = _spiece_tensor(tiny_spiece_model())
    return out


def write_tiny_umt5(path: str | Path, *, storage: str = "fp16", with_tokenizer: bool = True, seed: int = 0,
                    layout: str = "comfy", with_embed_tokens: bool = False) -> Path:
    """Write tiny_umt5_state_dict(...) as a safetensors file (mixed dtypes kept as they are)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_umt5_state_dict(storage=storage, with_tokenizer=with_tokenizer, seed=seed, layout=layout,
                                 with_embed_tokens=with_embed_tokens)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
