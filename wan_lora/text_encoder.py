"""Wan 2.1's text encoder (umt5-xxl, encoder only) from ComfyUI's `umt5_xxl_*.safetensors` files.

The files use HF T5 names, bare (`shared.weight`, `encoder.block.{i}...`, a relative-position bias in
every block as UMT5 has), so they map 1:1 onto transformers' UMT5EncoderModel, which is built on the
meta device from sizes read off the tensor shapes (no hub). They embed the sentencepiece tokenizer as
the uint8 tensor `spiece_model` (ComfyUI comfy/text_encoders/wan.py). The fp8_scaled file holds
fp8 Linear weights with a float32 scale each (`scale_weight`, or `weight_scale` + `comfy_quant` in
newer ComfyUI); they are dequantized when read, because transformers' UMT5 casts activations to
`wo.weight.dtype` and would compute in fp8 otherwise. Encoding follows Wan / diffusers WanPipeline:
Wan's prompt cleaning, EOS appended, at most 512 tokens, the encoder run on the real tokens, the rest
zero; ComfyUI's `(text:1.2)` weights are applied as ComfyUI does for every text encoder.
"""
from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..core.checkpoints import SAFETENSORS_SUFFIXES, file_fingerprint, load_state_dict
from ..core.errors import UnsupportedCheckpointError
from ..core.families import WAN_SENTINELS, detect_base_family
from ..core.guards import require_finite
from ..core.model_handle import FP8_DTYPES, Component
from ..core.prompt import parse_weights
from ..core.quantized import STORAGE_NAMES, dequantized, is_quantization_key, split_fp8_scales

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # Wan text_len / diffusers WanPipeline max_sequence_length
EOS_ID = 1  # umt5's sentencepiece ids: pad 0, eos 1, unk 2, no bos (google/umt5-xxl)
SPIECE_KEY = "spiece_model"
SHARED, EMBED_TOKENS = "shared.weight", "encoder.embed_tokens.weight"  # tied in UMT5EncoderModel
BLOCK_KEYS = ("layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight",
              "layer.0.SelfAttention.o.weight", "layer.0.SelfAttention.relative_attention_bias.weight",
              "layer.0.layer_norm.weight", "layer.1.DenseReluDense.wi_0.weight",
              "layer.1.DenseReluDense.wi_1.weight", "layer.1.DenseReluDense.wo.weight", "layer.1.layer_norm.weight")
UNUSED_PREFIXES = ("decoder.", "lm_head.")  # a full (encoder-decoder) UMT5 file: Wan uses the encoder only
DOWNLOAD_HINT = ("Download umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors from "
                 "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/tree/main/split_files/text_encoders "
                 "into ComfyUI's models/text_encoders folder and pick it here.")


@dataclass(frozen=True)
class UMT5Layout:
    """What a umt5 file's tensors say, read before any weight is loaded."""

    path: Path
    fingerprint: tuple[int, int]  # size and mtime when inspected: re-reads refuse a changed file
    config: dict[str, Any]  # transformers UMT5Config values, sizes from the tensor shapes
    storage: str  # fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2 or fp8_scaled
    scaled: bool  # fp8_scaled: weights are dequantized with their scales when read

    @property
    def d_model(self) -> int:
        return self.config["d_model"]


def inspect_umt5(path: str | Path) -> UMT5Layout:
    """Check the file is ComfyUI's umt5-xxl (any size, any storage) and read its architecture."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UnsupportedCheckpointError(
            f"{path.name} is a {path.suffix or 'extension-less'} file; the Wan text encoder is read from ComfyUI's "
            ".safetensors files, which embed the umt5 tokenizer (Wan's own models_t5_umt5-xxl-enc-bf16.pth has "
            f"none). {DOWNLOAD_HINT}")
    state = load_state_dict(path)  # memory-mapped: only shapes, dtypes and the small tensors are read here
    _refuse_other_models(path.name, state)
    if SPIECE_KEY not in state:
        raise UnsupportedCheckpointError(
            f"{path.name} is a umt5 text encoder without its tokenizer (no '{SPIECE_KEY}' tensor, which ComfyUI's "
            f"Wan text encoder files embed), so prompts cannot be tokenized. {DOWNLOAD_HINT}")
    config = umt5_config_from_shapes(path.name, state)
    _check_names(path.name, state, config)
    storage, scaled = _storage(path.name, state)
    _check_tokenizer(path.name, state[SPIECE_KEY], config["vocab_size"])
    return UMT5Layout(path=path, fingerprint=fingerprint, config=config, storage=storage, scaled=scaled)


def _refuse_other_models(name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Files users pick by mistake, named, before any size is read."""
    if "token_embedding.weight" in state or "blocks.0.attn.q.weight" in state:
        raise UnsupportedCheckpointError(
            f"{name} is Wan's original umt5 file (Wan-native names such as 'blocks.0.attn.q.weight'). It has no "
            f"embedded tokenizer, which Flipbook reads from ComfyUI's repackaged file instead. {DOWNLOAD_HINT}")
    family = detect_base_family(state)
    kind = None
    if family in ("sd15", "sd2", "sdxl"):
        kind = "a Stable Diffusion checkpoint"
    elif any(k.startswith(("text_model.", "cond_stage_model.", "clip_l.", "clip_g.")) for k in state):
        kind = "a CLIP text encoder"
    elif family == "wan" or any(k.endswith(WAN_SENTINELS) for k in state):
        kind = "the Wan diffusion model (it goes in the diffusion model input)"
    elif "encoder.block.0.layer.0.SelfAttention.q.weight" not in state:
        kind = "not a T5-family text encoder (no 'encoder.block.0.layer.0.SelfAttention.q.weight')"
    elif ("encoder.block.1.layer.0.SelfAttention.q.weight" in state
          and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in state):
        kind = "a T5 v1.1 XXL text encoder (Flux/SD3's t5xxl_*: relative-position bias in block 0 only)"
    if kind is not None:
        raise UnsupportedCheckpointError(f"{name} is {kind}; Wan 2.1 needs umt5-xxl. {DOWNLOAD_HINT}")


def _count_blocks(state: Mapping[str, torch.Tensor]) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def umt5_config_from_shapes(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """transformers UMT5Config values from the tensor shapes (real umt5-xxl: 256384, 4096, 64, 10240, 24, 64, 32)."""
    first = "encoder.block.0.layer."
    try:
        embedding = state[SHARED] if SHARED in state else state[EMBED_TOKENS]
        bias = state[first + "0.SelfAttention.relative_attention_bias.weight"]
        query = state[first + "0.SelfAttention.q.weight"]
        d_ff = state[first + "1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as exc:
        raise UnsupportedCheckpointError(
            f"{name} lacks {exc}, which every umt5 text encoder has; it may be damaged or not umt5 (a non-gated "
            f"T5 has 'wi' instead of 'wi_0'). {DOWNLOAD_HINT}") from None
    heads, buckets = bias.shape[1], bias.shape[0]
    if query.shape[0] % heads:
        raise UnsupportedCheckpointError(
            f"{name}: its attention is {query.shape[0]} wide, which does not split into its {heads} heads; the file "
            f"is damaged. {DOWNLOAD_HINT}")
    return {"vocab_size": embedding.shape[0], "d_model": embedding.shape[1], "d_kv": query.shape[0] // heads,
            "d_ff": d_ff, "num_layers": _count_blocks(state), "num_heads": heads,
            "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6}


def _encoder_keys(config: Mapping[str, Any]) -> set[str]:
    blocks = {f"encoder.block.{i}.{key}" for i in range(config["num_layers"]) for key in BLOCK_KEYS}
    return blocks | {SHARED, "encoder.final_layer_norm.weight"}


def _is_extra(key: str) -> bool:
    """Tensors that are not encoder weights: the tokenizer, quantization data, the tied copy, a decoder."""
    return key in (SPIECE_KEY, EMBED_TOKENS) or key.startswith(UNUSED_PREFIXES) or is_quantization_key(key)


def _check_names(name: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    expected = _encoder_keys(config)
    present = set(state) | ({SHARED} if EMBED_TOKENS in state else set())
    missing = sorted(expected - present)
    unexpected = sorted(k for k in state if k not in expected and not _is_extra(k))
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"{name} does not have the tensors of a {config['num_layers']}-layer umt5 encoder: {len(missing)} "
            f"missing (e.g. {missing[:3]}), {len(unexpected)} unknown (e.g. {unexpected[:3]}). It may be pruned, "
            f"damaged or in another layout. {DOWNLOAD_HINT}")


def _storage(name: str, state: Mapping[str, torch.Tensor]) -> tuple[str, bool]:
    """The storage name and whether the file is fp8_scaled (core/quantized checks every scale and format)."""
    layer = "encoder.block.0.layer.0.SelfAttention.q.weight"
    if state[layer].dtype not in STORAGE_NAMES:
        raise UnsupportedCheckpointError(
            f"{name} stores its weights as {state[layer].dtype} (e.g. GGUF or int8 quantization), which Flipbook "
            f"cannot read; use the fp16 or fp8_e4m3fn_scaled file. {DOWNLOAD_HINT}")
    weights = split_fp8_scales(state, metadata=None, file_name=name, hint=DOWNLOAD_HINT)
    return ("fp8_scaled" if weights.scaled else STORAGE_NAMES[state[layer].dtype]), weights.scaled


def _check_tokenizer(name: str, proto: torch.Tensor, vocab_size: int) -> None:
    tokenizer = UMT5Tokenizer(_proto_bytes(name, proto), source=name)
    if tokenizer.vocab_size > vocab_size:
        raise UnsupportedCheckpointError(
            f"{name}: its tokenizer has {tokenizer.vocab_size} tokens but its embedding only {vocab_size} rows; "
            f"the tokenizer belongs to another model. {DOWNLOAD_HINT}")


def _proto_bytes(name: str, proto: torch.Tensor) -> bytes:
    if proto.dtype != torch.uint8 or proto.ndim != 1 or proto.numel() == 0:
        raise UnsupportedCheckpointError(
            f"{name}: '{SPIECE_KEY}' should hold the tokenizer's bytes (a 1-D uint8 tensor), but it is "
            f"{proto.dtype} of shape {list(proto.shape)}. {DOWNLOAD_HINT}")
    return proto.numpy().tobytes()


def text_encoder_weights(layout: UMT5Layout, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The encoder's tensors under UMT5EncoderModel names. fp8 weights come back in `dtype`: scaled ones
    as W.float() * scale (comfy/ops.py scaled_fp8_ops), plain ones upcast; one layer at a time, so only one
    fp32 copy of a layer exists at once. Other tensors stay as stored (memory-mapped)."""
    state = load_state_dict(layout.path, expect=layout.fingerprint)
    weights = split_fp8_scales(state, metadata=None, file_name=layout.path.name, hint=DOWNLOAD_HINT)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.tensors.items():
        if _is_extra(key) and not (key == EMBED_TOKENS and SHARED not in state):
            continue
        scale = weights.scales.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if scale is not None:
            tensor = dequantized(tensor, scale).to(dtype)
        elif tensor.dtype in FP8_DTYPES:
            tensor = tensor.to(dtype)
        out[SHARED if key == EMBED_TOKENS else key] = tensor
    return out


def _supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"  # torch's CPU kernels cover bf16; other backends get fp32 to be safe


def text_encoder_dtype(requested: Optional[torch.dtype], *, device: torch.device) -> torch.dtype:
    """The dtype the encoder computes in. Never fp16 or fp8: T5's activations overflow fp16 (transformers
    keeps `wo` in fp32 for that, but only inside from_pretrained, which is not used here), and UMT5 casts
    activations to `wo`'s dtype. fp16/fp8/None become bf16 where the device has it, else fp32."""
    if requested in (torch.float32, torch.float64):
        return requested
    chosen = torch.bfloat16 if _supports_bf16(torch.device(device)) else torch.float32
    if requested not in (None, chosen):
        log.info("umt5 text encoder: computing in %s instead of %s (T5 overflows in fp16)", chosen, requested)
    return chosen


def text_encoder_component(layout: UMT5Layout, *, load_device: torch.device, offload_device: torch.device,
                           dtype: Optional[torch.dtype]) -> Component:
    """transformers UMT5EncoderModel built on the meta device from the file's sizes; weights read on demand."""
    from transformers import UMT5Config, UMT5EncoderModel

    compute = text_encoder_dtype(dtype, device=torch.device(load_device))
    with torch.device("meta"):
        module = UMT5EncoderModel(UMT5Config(**layout.config)).eval()
    return Component(name="text_encoder", module=module, weights=lambda: text_encoder_weights(layout, dtype=compute),
                     load_device=torch.device(load_device), offload_device=torch.device(offload_device),
                     dtype=compute)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (wan/modules/tokenizers.py, clean='whitespace'; diffusers' prompt_clean):
    html-unescape twice, strip, collapse whitespace. Wan runs ftfy.fix_text first; ftfy is not a dependency
    here and only repairs mis-decoded text (mojibake), so it is skipped."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class TokenizedPrompt:
    ids: tuple[int, ...]  # the real tokens, EOS last, at most MAX_TOKENS
    weights: tuple[float, ...]  # ComfyUI prompt weight of each token (1.0 for EOS)
    dropped: int  # tokens cut off by the MAX_TOKENS limit


class UMT5Tokenizer:
    """umt5's sentencepiece tokenizer from the bytes a ComfyUI file embeds (no BOS, EOS appended, pad 0)."""

    def __init__(self, model_proto: bytes, *, source: str = "the umt5 file") -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError, TypeError) as exc:
            raise UnsupportedCheckpointError(
                f"{source}: its embedded tokenizer ('{SPIECE_KEY}') is not a sentencepiece model ({exc}); the file "
                f"is damaged. {DOWNLOAD_HINT}") from None
        if self._sp.eos_id() != EOS_ID:
            raise UnsupportedCheckpointError(
                f"{source}: its embedded tokenizer ends prompts with token {self._sp.eos_id()}, umt5's with "
                f"{EOS_ID}; it belongs to another model. {DOWNLOAD_HINT}")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of the cleaned text, without EOS."""
        cleaned = clean_prompt(text)
        return list(self._sp.encode(cleaned)) if cleaned else []

    def tokenize(self, text: str) -> TokenizedPrompt:
        """ComfyUI syntax: each weighted segment tokenized alone and concatenated (comfy sd1_clip.SDTokenizer),
        then EOS. Over 512, the tail is cut and EOS kept last, as HF T5 tokenizers with truncation=True do for
        Wan's and diffusers' tokenizer(..., max_length=512, truncation=True, add_special_tokens=True)."""
        pairs = [(token, weight) for segment, weight in parse_weights(text) for token in self.encode(segment)]
        dropped = max(0, len(pairs) - (MAX_TOKENS - 1))
        pairs = pairs[:MAX_TOKENS - 1] + [(EOS_ID, 1.0)]
        return TokenizedPrompt(ids=tuple(t for t, _ in pairs), weights=tuple(w for _, w in pairs), dropped=dropped)


def load_tokenizer(layout: UMT5Layout) -> UMT5Tokenizer:
    state = load_state_dict(layout.path, expect=layout.fingerprint)
    return UMT5Tokenizer(_proto_bytes(layout.path.name, state[SPIECE_KEY]), source=layout.path.name)


@dataclass(frozen=True)
class PromptEmbedding:
    embeds: torch.Tensor  # [1, MAX_TOKENS, d_model]; rows from `tokens` on are zero, as Wan pads
    tokens: int  # real tokens, EOS included
    notes: tuple[str, ...] = ()  # for the node's report, e.g. a truncation


def _run_encoder(text_encoder: torch.nn.Module, ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[1, len(ids), d_model] fp32: the real tokens only, all attended (the same as Wan's padded run with its
    mask: masked keys add nothing to the real tokens' outputs)."""
    input_ids = torch.tensor([ids], device=device)
    out = text_encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
    return out.float()


def _padded(z: torch.Tensor, length: int) -> torch.Tensor:
    if z.shape[1] >= length:
        return z[:, :length]
    return torch.cat([z, z.new_zeros(z.shape[0], length - z.shape[1], z.shape[2])], dim=1)


@torch.no_grad()
def encode_prompt(text_encoder: torch.nn.Module, tokenizer: UMT5Tokenizer, text: str, *, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> PromptEmbedding:
    """Wan's text context for one prompt: [1, 512, d_model] in `dtype`, zero past the real tokens.
    Weighted tokens move away from the empty prompt's encoding, z = (z - z_empty) * w + z_empty
    (comfy/sd1_clip.py ClipTokenWeightEncoder); z_empty is zero past its own real tokens, as ComfyUI's
    zero_out_masked encoding of the empty prompt is."""
    prompt = tokenizer.tokenize(text)
    z = _run_encoder(text_encoder, prompt.ids, device)
    weights = torch.tensor(prompt.weights, device=z.device, dtype=z.dtype)
    if bool((weights != 1.0).any()):
        empty = _padded(_run_encoder(text_encoder, tokenizer.tokenize("").ids, device), z.shape[1])
        z = (z - empty) * weights[None, :, None] + empty
    require_finite(z, what="prompt embeddings", likely_causes="a damaged text encoder file")
    notes = ()
    if prompt.dropped:
        log.warning("prompt truncated at %d tokens: the last %d tokens were dropped", MAX_TOKENS, prompt.dropped)
        notes = (f"prompt truncated at {MAX_TOKENS} tokens ({prompt.dropped} dropped; Wan reads at most "
                 f"{MAX_TOKENS})",)
    return PromptEmbedding(embeds=_padded(z, MAX_TOKENS).to(dtype), tokens=len(prompt.ids), notes=notes)
