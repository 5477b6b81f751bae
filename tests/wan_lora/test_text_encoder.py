"""wan_lora/text_encoder.py on tiny umt5 files in ComfyUI's exact key layout (wan_lora/tiny_umt5.py), each
checked against an independent definition: sentencepiece's own ids and HF's T5 tokenizer, transformers'
UMT5EncoderModel run as diffusers' WanPipeline runs it, the fp8_scaled dequantization formula (comfy/ops.py),
ComfyUI's prompt-weight formula (comfy/sd1_clip.py); and the files users pick by mistake."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flipbook_pack.core.errors import InvalidSettingError, ModelFileChangedError, UnsupportedCheckpointError
from flipbook_pack.wan_lora import text_encoder as E
from flipbook_pack.wan_lora import tiny_umt5 as T

CPU = torch.device("cpu")
# the default Wan negative prompt (wan/configs/shared_config.py sample_neg_prompt)
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
            "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
            "杂乱的背景，三条腿，背景人很多，倒着走")
ENGLISH = "A red cat walks slowly across the green grass in the morning light, cinematic"
MIXED = "Studio Ghibli style, a girl rides a bicycle by the sea, 吉卜力风格，女孩在海边骑自行车"
DOWNLOAD = "umt5_xxl_fp16.safetensors"
# ComfyUI's umt5_xxl_* key names (reference notes §2.4, from comfy/text_encoders/t5.py and comfy/sd.py)
BLOCK_KEYS = ["layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight",
              "layer.0.SelfAttention.o.weight", "layer.0.SelfAttention.relative_attention_bias.weight",
              "layer.0.layer_norm.weight", "layer.1.DenseReluDense.wi_0.weight", "layer.1.DenseReluDense.wi_1.weight",
              "layer.1.DenseReluDense.wo.weight", "layer.1.layer_norm.weight"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    out = {storage: T.write_tiny_umt5(root / f"umt5_{storage}.safetensors", storage=storage)
           for storage in T.STORAGES}
    out["tied_copy"] = T.write_tiny_umt5(root / "umt5_tied.safetensors", storage="fp32", with_embed_tokens=True)
    return out


def _sentencepiece(path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=load_file(str(path))["spiece_model"].numpy().tobytes())


def _load(path, dtype=torch.float32):
    layout = E.inspect_umt5(path)
    component = E.text_encoder_component(layout, load_device=CPU, offload_device=CPU, dtype=dtype)
    component.materialize()
    return layout, component.module, E.load_tokenizer(layout)


def _reference_encoder(path):
    """transformers' UMT5EncoderModel with the tiny sizes written out here, loaded strictly from the file."""
    from transformers import UMT5Config, UMT5EncoderModel

    state = {k: v.float() for k, v in load_file(str(path)).items() if k != "spiece_model"}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    config = UMT5Config(vocab_size=state["shared.weight"].shape[0], d_model=32, d_kv=8, d_ff=48, num_layers=2,
                        num_heads=2, relative_attention_num_buckets=32)
    model = UMT5EncoderModel(config).eval()
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def _wan_pipeline_embeds(model, ids):
    """As diffusers WanPipeline._get_t5_prompt_embeds: ids padded to 512 with pad 0 and a mask, last_hidden_state,
    trimmed to the real length, zero-padded to 512."""
    padded = torch.zeros(1, 512, dtype=torch.long)
    padded[0, :len(ids)] = torch.tensor(ids)
    mask = (torch.arange(512) < len(ids)).long()[None]
    hidden = model(input_ids=padded, attention_mask=mask).last_hidden_state
    length = int(mask.sum())
    return torch.cat([hidden[:, :length], hidden.new_zeros(1, 512 - length, hidden.shape[2])], dim=1)


def test_tiny_file_has_comfyui_key_names_and_sizes(files):
    keys = set(load_file(str(files["fp16"])))
    assert keys == ({f"encoder.block.{i}.{k}" for i in range(2) for k in BLOCK_KEYS}
                    | {"shared.weight", "encoder.final_layer_norm.weight", "spiece_model"})
    layout = E.inspect_umt5(files["fp16"])
    assert layout.storage == "fp16" and layout.path == files["fp16"]
    assert layout.config == {"vocab_size": _sentencepiece(files["fp16"]).vocab_size(), "d_model": 32, "d_kv": 8,
                             "d_ff": 48, "num_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 32,
                             "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
                             "layer_norm_epsilon": 1e-6}


def test_real_umt5_xxl_sizes_are_read_from_real_shapes():
    """The umt5-xxl numbers of Wan's t5.py / transformers' config, from tensors of the real shapes (on meta)."""
    shapes = {"shared.weight": (256384, 4096), "encoder.final_layer_norm.weight": (4096,)}
    for i in range(24):
        shapes.update({f"encoder.block.{i}.layer.0.SelfAttention.q.weight": (4096, 4096),
                       f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
                       f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight": (10240, 4096)})
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = E.umt5_config_from_shapes("umt5_xxl_fp16.safetensors", state)
    assert {k: config[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                   "relative_attention_num_buckets")} == {
        "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32}


@pytest.mark.parametrize("text", [ENGLISH, NEGATIVE, MIXED])
def test_token_ids_are_sentencepieces_own_plus_eos(files, text):
    tokenizer = E.load_tokenizer(E.inspect_umt5(files["fp16"]))
    prompt = tokenizer.tokenize(text)
    assert list(prompt.ids) == _sentencepiece(files["fp16"]).encode(text) + [1]
    assert set(prompt.weights) == {1.0} and prompt.dropped == 0


def test_prompt_is_cleaned_as_wan_does(files):
    """Wan's whitespace clean: html-unescaped twice ('&amp;lt;' -> '<'), stripped, runs of whitespace -> one space."""
    tokenizer = E.load_tokenizer(E.inspect_umt5(files["fp16"]))
    assert tokenizer.tokenize("  a  red\n\tcat &amp;lt;3 ").ids == tokenizer.tokenize("a red cat <3").ids
    assert list(tokenizer.tokenize("").ids) == [1]


def test_truncation_keeps_eos_last_like_hf_t5_tokenizers(files, caplog):
    from transformers import T5Tokenizer

    sp = _sentencepiece(files["fp32"])
    text = " ".join(["red cat walks"] * 300)
    try:  # transformers 5 builds the T5 tokenizer from the pieces and scores
        hf = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())], extra_ids=0)
    except TypeError:
        pytest.skip("this transformers builds T5Tokenizer from a file only")
    expected = hf(text, padding="max_length", max_length=512, truncation=True, add_special_tokens=True).input_ids
    assert len(expected) == 512 and expected[-1] == 1 and expected[:511] == sp.encode(text)[:511]
    layout, module, tokenizer = _load(files["fp32"])
    assert list(tokenizer.tokenize(text).ids) == expected
    with caplog.at_level(logging.WARNING):
        result = E.encode_prompt(module, tokenizer, text, device=CPU)
    assert result.tokens == 512 and bool((result.embeds[0].abs().sum(-1) > 0).all())
    assert "truncated at 512" in result.notes[0] and "truncated at 512" in caplog.text


@pytest.mark.parametrize("text", [ENGLISH, NEGATIVE, MIXED])
def test_encoding_equals_transformers_run_as_wan_pipeline(files, text):
    _, module, tokenizer = _load(files["fp32"])
    ours = E.encode_prompt(module, tokenizer, text, device=CPU)
    ids = _sentencepiece(files["fp32"]).encode(text) + [1]
    expected = _wan_pipeline_embeds(_reference_encoder(files["fp32"]), ids)
    assert ours.embeds.shape == (1, 512, 32) and ours.embeds.dtype == torch.float32 and ours.tokens == len(ids)
    torch.testing.assert_close(ours.embeds, expected, atol=1e-5, rtol=0)
    assert not ours.embeds[0, len(ids):].any()


# relative error to the fp32 file's output: fp16/bf16 round the weights (2^-11 / 2^-8); fp8 keeps 3 mantissa bits,
# which on this random tiny encoder moves the output by ~15% (the dequantized-copy test below is the exact check)
STORAGE_TOLERANCE = {"fp32": 0.0, "fp16": 1e-2, "bf16": 5e-2, "fp8_e4m3fn": 0.3, "fp8_scaled": 0.3,
                     "fp8_scaled_new": 0.3}


@pytest.mark.parametrize("storage", T.STORAGES)
def test_every_storage_loads_and_never_keeps_fp8_weights(files, storage):
    layout, module, tokenizer = _load(files[storage])
    assert layout.storage == ("fp8_scaled" if storage.startswith("fp8_scaled") else storage)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    ours = E.encode_prompt(module, tokenizer, MIXED, device=CPU).embeds
    _, reference, _ = _load(files["fp32"])
    full = E.encode_prompt(reference, tokenizer, MIXED, device=CPU).embeds
    assert float((ours - full).norm() / full.norm()) <= STORAGE_TOLERANCE[storage]


def _dequantized_copy(path, target):
    """The fp8 file's weights by the formula W_real = W_fp8.float() * scale, written to an fp32 file."""
    state = load_file(str(path))
    out = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".weight_scale", ".comfy_quant")):
            continue
        base = key.removesuffix(".weight")
        scale = state.get(base + ".scale_weight", state.get(base + ".weight_scale"))
        out[key] = value.float() * scale if scale is not None else (value.float() if value.is_floating_point()
                                                                        else value)
    save_file(out, str(target))
    return target


@pytest.mark.parametrize("storage", ["fp8_scaled", "fp8_scaled_new", "fp8_e4m3fn"])
def test_fp8_files_equal_their_dequantized_copy(files, storage, tmp_path):
    """Both files hold the same fp32 numbers (W_fp8 * s is one fp32 multiply either way), so the weights are
    equal exactly and the outputs up to 1e-6 (the same kernels on the same numbers: equal in practice)."""
    copy = _dequantized_copy(files[storage], tmp_path / "dequantized.safetensors")
    _, module, tokenizer = _load(files[storage])
    _, reference, _ = _load(copy)
    for (name, ours), (_, theirs) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    for text in (ENGLISH, NEGATIVE):
        torch.testing.assert_close(E.encode_prompt(module, tokenizer, text, device=CPU).embeds,
                                   E.encode_prompt(reference, tokenizer, text, device=CPU).embeds, atol=1e-6, rtol=0)


def test_scales_bring_fp8_weights_back_to_the_original_values(files):
    """e4m3fn keeps 3 mantissa bits: each dequantized weight is within 1/16 of the original (plus the subnormal
    step); without the ~1e-3 scales they would be ~700x too large."""
    original = T.tiny_umt5_state_dict(storage="fp32")
    weights = E.text_encoder_weights(E.inspect_umt5(files["fp8_scaled"]))
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    scale = load_file(str(files["fp8_scaled"]))[key.replace(".weight", ".scale_weight")]
    assert 1e-4 < float(scale) < 1e-2
    assert bool(((weights[key] - original[key]).abs() <= original[key].abs() / 16 + scale * 2**-9).all())


def _edited(path, target, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(target))
    return target


def test_fp8_scaled_without_its_scales_is_refused(files, tmp_path):
    layer = "encoder.block.1.layer.1.DenseReluDense.wo"
    cases = {
        "all_legacy_scales.safetensors": (files["fp8_scaled"], lambda s: [s.pop(k) for k in list(s)
                                                                            if k.endswith(".scale_weight")]),
        "one_legacy_scale.safetensors": (files["fp8_scaled"], lambda s: s.pop(layer + ".scale_weight")),
        "one_new_scale.safetensors": (files["fp8_scaled_new"], lambda s: s.pop(layer + ".weight_scale")),
    }
    for name, (source, edit) in cases.items():
        path = _edited(source, tmp_path / name, edit)
        if name.startswith("all"):
            assert "scaled_fp8" in load_file(str(path))  # the marker is kept
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(UnsupportedCheckpointError, match="no '.scale_weight'") as error:
            E.inspect_umt5(path)
        assert name in str(error.value) and sorted(os.listdir(tmp_path)) == before
        if name.startswith("one"):
            assert f"'{layer}'" in str(error.value)


def test_unknown_comfy_quant_format_is_refused(files, tmp_path):
    layer = "encoder.block.0.layer.0.SelfAttention.q"

    def to_nvfp4(state):
        state[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                     dtype=torch.uint8)

    path = _edited(files["fp8_scaled_new"], tmp_path / "umt5_nvfp4.safetensors", to_nvfp4)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnsupportedCheckpointError, match="nvfp4") as error:
        E.inspect_umt5(path)
    assert "umt5_nvfp4.safetensors" in str(error.value) and layer in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before


def _row_range(sp, before: str, word: str) -> range:
    start = len(sp.encode(before)) if before else 0
    return range(start, start + len(sp.encode(word)))


@pytest.mark.parametrize("text,plain,before,word,weight", [
    ("a (red:1.5) cat", "a red cat", "a", "red", 1.5),
    ("(a:0.5) red cat", "a red cat", "", "a", 0.5),  # row 0, where the empty prompt's encoding is not zero
])
def test_prompt_weight_changes_only_its_tokens_by_comfyuis_formula(files, text, plain, before, word, weight):
    sp = _sentencepiece(files["fp32"])
    _, module, tokenizer = _load(files["fp32"])
    ids = sp.encode(plain) + [1]
    assert list(tokenizer.tokenize(text).ids) == ids  # whole words: the segments give the same pieces
    reference = _reference_encoder(files["fp32"])
    z, z_empty = _wan_pipeline_embeds(reference, ids), _wan_pipeline_embeds(reference, [1])
    assert not z_empty[0, 1:].any()
    rows = list(_row_range(sp, before, word))
    expected = z.clone()
    expected[0, rows] = (z[0, rows] - z_empty[0, rows]) * weight + z_empty[0, rows]
    ours = E.encode_prompt(module, tokenizer, text, device=CPU).embeds
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0, rows], z[0, rows])


def test_weight_one_is_identical_to_no_weight_and_bad_weights_are_refused(files):
    _, module, tokenizer = _load(files["fp32"])
    plain = E.encode_prompt(module, tokenizer, "a red cat", device=CPU).embeds
    assert torch.equal(E.encode_prompt(module, tokenizer, "a (red:1) cat", device=CPU).embeds, plain)
    for bad in ("a (red:11) cat", "a (red:inf) cat", "a (red:nan) cat"):
        with pytest.raises(InvalidSettingError):
            E.encode_prompt(module, tokenizer, bad, device=CPU)


def _clip_file(path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}, str(path))


def _sd_checkpoint_clip(path):
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)},
              str(path))


BAD_FILES = {
    "no_tokenizer.safetensors": (lambda p: T.write_tiny_umt5(p, with_tokenizer=False), "spiece_model"),
    "clip_l.safetensors": (_clip_file, "CLIP"),
    "sd_clip_only.safetensors": (_sd_checkpoint_clip, "CLIP"),
    "t5xxl_fp16.safetensors": (lambda p: T.write_tiny_umt5(p, layout="t5_v1_1"), "T5 v1.1 XXL"),
    "wan_native.safetensors": (lambda p: T.write_tiny_umt5(p, layout="wan", storage="bf16"), "no embedded tokenizer"),
    "models_t5_umt5-xxl-enc-bf16.pth": (
        lambda p: torch.save(T.tiny_umt5_state_dict(layout="wan", storage="bf16"), str(p)), "has none"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_files_picked_by_mistake_are_refused_naming_the_file_and_writing_nothing(tmp_path, name):
    write, reason = BAD_FILES[name]
    path = tmp_path / name
    write(path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnsupportedCheckpointError, match=reason) as error:
        E.inspect_umt5(path)
    message = str(error.value)
    assert name in message and DOWNLOAD in message and "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in message
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("which", ["fp32", "tied_copy"])
def test_tied_embedding_is_one_tensor(files, which):
    _, module, _ = _load(files[which])
    assert module.shared.weight is module.encoder.embed_tokens.weight
    assert torch.equal(module.shared.weight, load_file(str(files[which]))["shared.weight"])


def test_never_computes_in_fp16_or_fp8(files, monkeypatch):
    assert E.text_encoder_dtype(torch.float16, device=CPU) == torch.bfloat16
    assert E.text_encoder_dtype(torch.float8_e4m3fn, device=CPU) == torch.bfloat16
    assert E.text_encoder_dtype(None, device=CPU) == torch.bfloat16
    assert E.text_encoder_dtype(torch.float32, device=CPU) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert E.text_encoder_dtype(torch.float16, device=torch.device("cuda")) == torch.float32
    monkeypatch.undo()
    _, module, tokenizer = _load(files["fp16"], dtype=torch.float16)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    ours = E.encode_prompt(module, tokenizer, ENGLISH, device=CPU, dtype=torch.float16).embeds
    _, full, _ = _load(files["fp32"])
    reference = E.encode_prompt(full, tokenizer, ENGLISH, device=CPU).embeds
    assert ours.dtype == torch.float16
    assert float((ours.float() - reference).norm() / reference.norm()) < 5e-2


def test_weights_are_not_read_from_a_replaced_file(files, tmp_path):
    path = T.write_tiny_umt5(tmp_path / "umt5.safetensors", storage="fp16")
    layout = E.inspect_umt5(path)
    os.utime(path, ns=(layout.fingerprint[1] + 10**9, layout.fingerprint[1] + 10**9))
    with pytest.raises(ModelFileChangedError):
        E.text_encoder_weights(layout)
