"""The one place that touches ComfyUI (folder_paths, comfy.utils, comfy.model_management, comfy.model_patcher,
cli args).

Every function works without ComfyUI too, against a `HeadlessHost` (models and output folders in
ComfyUI's layout) that the `flipbook` CLI and the tests configure, so the same node classes run
inside ComfyUI and headless.
"""
from __future__ import annotations

import importlib
import logging
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import IncompatibleModelsError, InvalidSettingError, ModelFileNotFoundError

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
ANIMATEDIFF_FOLDER = "animatediff_models"  # the folder name AnimateDiff-Evolved registers; users already have it
MOTION_LORA_FOLDER = "animatediff_motion_lora"  # AnimateDiff-Evolved's folder for motion LoRAs


@dataclass
class HeadlessHost:
    models_dir: Path
    output_dir: Path
    disable_metadata: bool = False
    input_dir: Optional[Path] = None


_headless: Optional[HeadlessHost] = None


def use_headless(host: Optional[HeadlessHost]) -> None:
    """Point the nodes at plain folders instead of a running ComfyUI (CLI and tests)."""
    global _headless
    _headless = host


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _management():
    return None if _headless is not None else _module("comfy.model_management")


def _folder_paths():
    return None if _headless is not None else _module("folder_paths")


def register_model_folders() -> None:
    """Inside ComfyUI: add models/animatediff_models and models/animatediff_motion_lora to those model folders (as
    AnimateDiff-Evolved does), also when extra_model_paths.yaml or another pack already registered the names."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return
    for folder in (ANIMATEDIFF_FOLDER, MOTION_LORA_FOLDER):
        folder_paths.add_model_folder_path(folder, str(Path(folder_paths.models_dir) / folder))
        extensions = folder_paths.folder_names_and_paths[folder][1]
        if extensions:  # an empty set means "every file"; otherwise make sure model files are listed
            extensions.update(MODEL_SUFFIXES)


def _inside(root: Path, name: str, what: str) -> Path:
    """root/name, refusing absolute names and '..' (symlinked files inside the folder are fine)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not name:
        raise ModelFileNotFoundError(f"{name!r} points outside the {what} ({root}); use a name inside it.")
    return root / relative


def model_names(folder: str) -> list[str]:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return list(folder_paths.get_filename_list(folder))
    if _headless is None:
        return []
    root = _headless.models_dir / folder
    files = root.rglob("*") if root.is_dir() else []
    return sorted(p.relative_to(root).as_posix() for p in files if p.suffix.lower() in MODEL_SUFFIXES)


def model_path(folder: str, name: str) -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        found = folder_paths.get_full_path(folder, name)
        if found:
            return Path(found)
        where = ", ".join(folder_paths.get_folder_paths(folder))
    else:
        root = _headless.models_dir / folder if _headless else Path(folder)
        candidate = _inside(root, name, f"{folder} folder")
        if candidate.is_file():
            return candidate
        where = str(root)
    raise ModelFileNotFoundError(f"{name!r} is not in the {folder} folder ({where}). Put the file there and refresh.")


def output_dir() -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return _headless.output_dir if _headless else Path("output")


def metadata_disabled() -> bool:
    if _headless is not None:
        return _headless.disable_metadata
    cli_args = _module("comfy.cli_args")
    return bool(cli_args and getattr(cli_args.args, "disable_metadata", False))


def clip_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's own copy of the CLIP tokenizer when running inside it (else the bundled one is used)."""
    sd1_clip = None if _headless is not None else _module("comfy.sd1_clip")
    if sd1_clip is None:
        return None
    folder = Path(sd1_clip.__file__).parent / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


class _Progress:
    """ComfyUI's progress bar for one node run; every update is a cancel point. With a latent format
    (comfy.latent_formats: "SD15", "Wan21") steps also send a latent preview, as the user's --preview-method
    says (Latent2RGB or TAESD). Headless: a log line per update."""

    def __init__(self, total: int, latent_format: Optional[str] = None) -> None:
        utils = None if _headless is not None else _module("comfy.utils")
        self.management = _management()
        self.bar = utils.ProgressBar(total) if utils is not None and self.management is not None else None
        self.previewer = _previewer(self.management, latent_format) if self.bar and latent_format else None
        self.done, self.total = 0, total

    def __call__(self, done: int, of: int, preview=None) -> None:
        if self.management is not None:
            self.management.throw_exception_if_processing_interrupted()
        self.done, self.total = done, of
        if self.bar is not None:
            self.bar.update_absolute(done, of, preview) if preview is not None else self.bar.update_absolute(done, of)
        else:
            log.info("progress %d/%d", done, of)

    def _image(self, denoised: torch.Tensor):
        if self.previewer is None:
            return None
        try:
            return self.previewer.decode_latent_to_preview_image("JPEG", denoised)
        except Exception as exc:  # a preview must never fail a run
            log.debug("latent preview failed: %s", exc)
            return None

    def step(self, step: int, of: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """A sampler callback that is the progress itself (one evaluation per step)."""
        self(step, of, self._image(denoised))

    def preview(self, step: int, of: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """A sampler callback that only adds the preview; the progress counts come from elsewhere."""
        image = self._image(denoised)
        if image is not None:
            self(self.done, self.total, image)


def progress_reporter(total: int, latent_format: Optional[str] = None) -> _Progress:
    """A (done, total) callback driving ComfyUI's progress bar; `.preview` / `.step` are sampler callbacks."""
    return _Progress(total, latent_format)


def v3_api():
    """comfy_api.latest (io, ComfyExtension) when running inside a ComfyUI that has it."""
    if _headless is not None:
        return None
    return _module("comfy_api.latest")


def torch_device() -> Optional[str]:
    """The device ComfyUI computes on (honours --cpu, --directml, --cuda-device); None when headless."""
    management = _management()
    return str(management.get_torch_device()) if management is not None else None


def has_video_api() -> bool:
    api = v3_api()
    return api is not None and hasattr(api, "InputImpl") and hasattr(getattr(api, "InputImpl"), "VideoFromComponents")


def video_from_frames(images, fps: float, audio=None):
    """ComfyUI's native VIDEO object (comfy_api VideoFromComponents) for our frames."""
    from fractions import Fraction

    api = v3_api()
    components = api.Types.VideoComponents(images=images, frame_rate=Fraction(fps).limit_denominator(1001),
                                           audio=audio)
    return api.InputImpl.VideoFromComponents(components)


def _input_dir() -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return _headless.input_dir if _headless and _headless.input_dir else Path("input")


def input_files() -> list[str]:
    """Video files in ComfyUI's input folder (top level, as core LoadVideo lists them)."""
    from ..core.media.load_video import VIDEO_SUFFIXES

    folder = _input_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def input_path(name: str) -> Path:
    """A file in ComfyUI's input folder ('name [output]'/'[temp]' annotations as ComfyUI reads them);
    absolute names and '..' are refused: a workflow must not read arbitrary files of the server."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return _inside(_input_dir(), name, "input folder")
    plain, root = name, Path(folder_paths.get_input_directory())
    for tag, getter in ((" [output]", "get_output_directory"), (" [temp]", "get_temp_directory"),
                        (" [input]", "get_input_directory")):
        if name.endswith(tag):
            plain, root = name[: -len(tag)], Path(getattr(folder_paths, getter)())
    return _inside(root, plain, "input folder")


def compute_dtype():
    """ComfyUI's UNet precision for this device (honours --fp16-unet/--bf16-unet/--fp32-unet, --force-fp32,
    cards where fp16 is broken); None headless. fp8/fp64 choices fall back to what the device computes."""
    management = _management()
    if management is None:
        return None
    device = management.get_torch_device()
    computable = (torch.float16, torch.bfloat16, torch.float32)
    chosen = management.unet_dtype(device, supported_dtypes=list(computable))
    if chosen in computable:
        return chosen
    log.info("ComfyUI chose %s for UNets; Flipbook's networks compute in fp16/bf16/fp32", chosen)
    if management.should_use_fp16(device):
        return torch.float16
    return torch.bfloat16 if management.should_use_bf16(device) else torch.float32


def component_placements() -> Optional[dict]:
    """Inside ComfyUI: (compute device, offload device, dtype) per component, as ComfyUI places its own
    UNet, text encoder and VAE (so --lowvram, --highvram, --gpu-only, --cpu, --cpu-vae and the precision
    flags mean the same for Flipbook's models). None headless."""
    management = _management()
    if management is None:
        return None
    unet_device = management.get_torch_device()
    text_device, vae_device = management.text_encoder_device(), management.vae_device()
    # ComfyUI stores text encoders in fp16 even on the CPU but computes them in fp32 (comfy/sd1_clip.py,
    # manual_cast ops); transformers computes in the storage dtype, so on the CPU the encoder is fp32
    text_dtype = management.text_encoder_dtype(text_device)
    if text_device.type == "cpu" or text_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        text_dtype = torch.float32 if text_device.type == "cpu" else compute_dtype()
    # ComfyUI runs the SD1.x VAE in bf16 or fp32 (supported_models.py SD15 VAE working dtypes): fp16 overflows
    vae_dtype = management.vae_dtype(vae_device, [torch.bfloat16, torch.float32])
    return {
        "unet": (unet_device, management.unet_offload_device(), compute_dtype()),
        "text_encoder": (text_device, management.text_encoder_offload_device(), text_dtype),
        "vae": (vae_device, management.vae_offload_device(), vae_dtype),
    }


def wan_placements() -> Optional[dict]:
    """Inside ComfyUI: (compute device, offload device, dtype) for the Wan transformer, umt5 and VAE, as ComfyUI
    places its own Wan models. The transformer computes in bf16 where the card has it (Wan's param dtype;
    ComfyUI's WAN21 also allows fp16 and fp32), umt5 in bf16 or fp32 (T5 overflows in fp16), the VAE in bf16
    or fp32. None headless."""
    management = _management()
    if management is None:
        return None
    unet_device = management.get_torch_device()
    transformer_dtype = management.unet_dtype(unet_device, supported_dtypes=[torch.bfloat16, torch.float16,
                                                                            torch.float32])
    if transformer_dtype not in (torch.bfloat16, torch.float16, torch.float32):  # fp8 weight dtypes: ours cast
        transformer_dtype = torch.bfloat16 if management.should_use_bf16(unet_device) else torch.float16
    text_device, vae_device = management.text_encoder_device(), management.vae_device()
    text_dtype = torch.bfloat16 if text_device.type != "cpu" and management.should_use_bf16(text_device) \
        else torch.float32
    return {
        "transformer": (unet_device, management.unet_offload_device(), transformer_dtype),
        "text_encoder": (text_device, management.text_encoder_offload_device(), text_dtype),
        "vae": (vae_device, management.vae_offload_device(),
                management.vae_dtype(vae_device, [torch.bfloat16, torch.float32])),
    }


def step_reporter(total: int, latent_format: str = "Wan21"):
    """A sampler callback (step, total, x, denoised): ComfyUI's progress bar with a latent preview; each step is a
    cancel point. Headless: a log line per step."""
    return _Progress(total, latent_format).step


def _previewer(management, latent_format: str):
    if management is None:
        return None
    latent_preview, formats = _module("latent_preview"), _module("comfy.latent_formats")
    if latent_preview is None or formats is None or not hasattr(formats, latent_format):
        return None
    return latent_preview.get_previewer(management.get_torch_device(), getattr(formats, latent_format)())


def memory_for(handle):
    """Inside ComfyUI: a memory policy that hands the handle's components to ComfyUI's model manager
    (one ModelPatcher each, kept as long as the handle lives); None headless (the pipeline's local policy)."""
    management, patcher_module = _management(), None if _headless is not None else _module("comfy.model_patcher")
    if management is None or patcher_module is None:
        return None
    memory = _MANAGED.get(handle)
    if memory is None:
        memory = _MANAGED[handle] = ComfyMemory(handle, management=management, patcher_module=patcher_module,
                                                ops=_module("comfy.ops"))
    return memory


_MANAGED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Managed(torch.nn.Module):
    """What a ModelPatcher manages: one component's network. ModelPatcher keeps its bookkeeping in
    attributes of its model (`device`, `model_loaded_weight_memory`, ...), which diffusers and
    transformers models partly define as read-only properties, hence the wrapper."""

    def __init__(self, component) -> None:
        super().__init__()
        self.network = component.module
        self.flipbook_dtype = component.dtype

    def get_dtype(self):  # ModelPatcher.model_dtype() asks for it
        return self.flipbook_dtype


class ComfyMemory:
    """Flipbook components as ComfyUI models: loading one can evict any other model (ours or not),
    ComfyUI's "Unload models" and POST /free unload ours, and --lowvram streams what does not fit.

    - leaf layers become ComfyUI's cast-on-forward layers (comfy.ops.disable_weight_init: the same
      nn.Linear/Conv/Norm/Embedding with a cast path), so a partial load can leave weights on the
      offload device and stream them, as ComfyUI does for its own models;
    - after every load, the few tensors ComfyUI does not move (buffers, norm weights of layers
      without a cast path) follow the model to its device;
    - where unloading cannot free memory (compute and offload device are the same: --cpu,
      --gpu-only), an unload releases the weights; the next use reads them from the file again.
    """

    def __init__(self, handle, *, management, patcher_module, ops) -> None:
        self.management = management
        self.patchers = {name: self._patcher(component, patcher_module, ops)
                         for name, component in handle.components.items()}
        self.components = dict(handle.components)  # not the handle itself: _MANAGED holds it weakly

    def _patcher(self, component, patcher_module, ops):
        _make_castable(component.module, ops)
        # ComfyUI logs "Requested to load <class name>": name it after the component
        managed = type(f"Flipbook_{component.name}", (_Managed,), {})(component)
        patcher = patcher_module.ModelPatcher(managed, load_device=component.load_device,
                                              offload_device=component.offload_device, size=component.size_bytes)
        callbacks = getattr(_module("comfy.patcher_extension"), "CallbacksMP", None)
        if callbacks is not None:
            patcher.add_callback(callbacks.ON_LOAD, lambda p, device_to, *_: _move_uncastable(p.model, device_to))
            # load_models_gpu also detaches (unpatch_all=False) a model it is about to load again: not an unload
            patcher.add_callback(callbacks.ON_DETACH,
                                 lambda p, unpatch_all=True: unpatch_all and _release_if_unmovable(component))
        return patcher

    def prepare(self, components, working_bytes: int = 0) -> None:
        wanted = list(components)
        for component in wanted:  # released by an earlier unload: onto the CPU, ComfyUI makes room and moves them
            component.restore(torch.device("cpu"))
            # what the component holds now (e.g. LoRA factors added since the patcher was made)
            self.patchers[component.name].size = component.size_bytes
        self.management.load_models_gpu([self.patchers[c.name] for c in wanted], memory_required=working_bytes)


def _castable_classes(ops) -> dict:
    base = getattr(ops, "disable_weight_init", None)
    names = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "Embedding")
    return {getattr(torch.nn, n): getattr(base, n) for n in names if base is not None and hasattr(base, n)}


def _make_castable(module, ops) -> None:
    """Give plain torch layers ComfyUI's cast-on-forward subclass (same state, one extra code path). Layers
    that cast their own weights at every forward (core.quantized.StoredLinear: fp8 Wan blocks, 98% of the
    14B model) get the attributes ModelPatcher.load looks for to stream a layer (comfy/model_patcher.py:
    `comfy_cast_weights`, `weight_function`, `bias_function`), so a partial load leaves them on the offload
    device instead of copying all of them to the GPU."""
    from ..core.quantized import StoredLinear

    classes = _castable_classes(ops)
    for layer in module.modules():
        if isinstance(layer, StoredLinear):
            layer.comfy_cast_weights, layer.weight_function, layer.bias_function = False, [], []
            continue
        castable = classes.get(type(layer))
        if castable is not None:
            layer.__class__ = castable
            if isinstance(layer, torch.nn.Embedding):
                layer.bias = None  # ComfyUI's Embedding sets this in reset_parameters, which a class swap skips


def _move_uncastable(model, device) -> None:
    for layer in model.modules():
        if hasattr(layer, "comfy_cast_weights"):
            continue  # ComfyUI loads or streams these itself
        for name, param in list(layer._parameters.items()):
            if param is not None and param.device != device:
                layer._parameters[name] = torch.nn.Parameter(param.data.to(device), requires_grad=False)
        for name, buffer in list(layer._buffers.items()):
            if buffer is not None and buffer.device != device:
                layer._buffers[name] = buffer.to(device)


def _release_if_unmovable(component) -> None:
    # ModelPatcher.__del__ detaches too: nothing to release while the interpreter shuts down
    if component.load_device == component.offload_device and not sys.is_finalizing():
        log.info("ComfyUI unloaded %s; releasing its weights (read again from the file when next used)",
                 component.name)
        component.release()


# --- ComfyUI's own SD1.5 networks handed to the Lightning loader (lightning/host_parts.py) ---------------------

def host_parts(model=None, clip=None, vae=None):
    """ComfyUI's MODEL / CLIP / VAE as the Lightning loader's host parts, each checked to be SD1.5's."""
    from ..lightning.host_parts import HostParts, HostWeights

    unet = vae_weights = encode_text = None
    if model is not None:
        _check_sd15_model(model)
        unet = HostWeights(stored=lambda: _stored(model, "diffusion_model."),
                           patched=lambda: _patched(model, "diffusion_model."))
    if vae is not None:
        _check_sd15_vae(vae)
        vae_weights = HostWeights(stored=lambda: _stored(vae.patcher, ""), patched=lambda: _patched(vae.patcher, ""))
    if clip is not None:
        if not (hasattr(clip, "tokenize") and hasattr(clip, "encode_from_tokens")):
            raise InvalidSettingError(f"The clip input is not a ComfyUI CLIP (got {type(clip).__name__}).")
        # SD1.5's is comfy.sd1_clip.SD1ClipModel itself (SD2's subclasses it, SDXL's is SDXLClipModel): refuse the
        # others at load time, before a sampler asks for a prompt
        kind = type(getattr(clip, "cond_stage_model", None)).__name__
        if kind != "SD1ClipModel":
            raise IncompatibleModelsError(
                f"The clip input is a {kind} (not SD1.5's CLIP ViT-L): AnimateDiff motion modules are SD1.5 only. "
                "Connect the CLIP of an SD1.5 checkpoint (Load Checkpoint's CLIP output).")
        encode_text = lambda text: clip.encode_from_tokens(clip.tokenize(text)).float().cpu()  # noqa: E731
    return HostParts(unet=unet, vae=vae_weights, encode_text=encode_text)


def _check_sd15_model(model) -> None:
    """An SD1.5 epsilon model whose only changes are weight patches (LoRAs): sampler-side patches (FreeU, model
    sampling overrides, attention replacements) live in ComfyUI's sampling code, which Flipbook does not run."""
    base = getattr(model, "model", None)
    config = type(getattr(base, "model_config", None)).__name__
    kind = getattr(getattr(base, "model_type", None), "name", "?")
    if not hasattr(model, "get_key_patches") or config not in ("SD15",) or kind != "EPS":
        raise IncompatibleModelsError(
            f"The model input is {config if hasattr(model, 'get_key_patches') else type(model).__name__} ({kind}), "
            "but AnimateDiff motion modules need an SD1.5 epsilon model. Connect the MODEL of an SD1.5 checkpoint "
            "(Load Checkpoint, then LoRA loaders).")
    extra = _sampling_patches(model)
    if extra:
        raise IncompatibleModelsError(
            f"The model input carries ComfyUI sampling patches Flipbook cannot apply ({', '.join(extra)}; e.g. "
            "FreeU, ModelSamplingDiscrete, caches, attention patches, another pack's wrappers). Only weight patches "
            "(LoRA loaders) carry over: connect the MODEL before those nodes.")


def _sampling_patches(model) -> list:
    """Names of everything on a ModelPatcher beyond its weight patches: model options (transformer_options
    entries included), object patches, and the wrappers, callbacks, injections and additional models that packs
    and core nodes (EasyCache, AnimateDiff-Evolved) attach."""
    def filled(value) -> bool:
        return bool(value) and (not isinstance(value, dict) or any(filled(v) for v in value.values()))

    options = getattr(model, "model_options", {}) or {}
    found = {k for k, v in options.items() if k != "transformer_options" and v is not None}
    found |= {k for k, v in (options.get("transformer_options") or {}).items() if filled(v)}
    found |= set(getattr(model, "object_patches", {}) or {})
    for attribute in ("wrappers", "callbacks", "injections", "additional_models", "weight_wrapper_patches"):
        if filled(getattr(model, attribute, None)):
            found.add(attribute)
    return sorted(found)


def _check_sd15_vae(vae) -> None:
    keys = set(_stored(vae.patcher, "")) if hasattr(vae, "patcher") else set()
    if getattr(vae, "latent_channels", None) != 4 or "encoder.down.0.block.0.conv1.weight" not in keys \
            or "decoder.up.0.block.0.conv1.weight" not in keys:
        raise IncompatibleModelsError(
            f"The vae input is not an SD1.x VAE (latent channels {getattr(vae, 'latent_channels', '?')}); SD1.5 "
            "needs a 4-channel KL VAE such as vae-ft-mse-840000-ema-pruned.safetensors (Load VAE).")


# fp8 scale tensors of ComfyUI's scaled-fp8 layers: their convert function has already applied them
SCALE_LEAVES = ("scale_weight", "scale_input")
COMPUTABLE = (torch.float16, torch.bfloat16, torch.float32)


def _stored(patcher, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in patcher.model_state_dict(prefix or None).items()
            if k.rpartition(".")[2] not in SCALE_LEAVES}


def _patched(patcher, prefix: str) -> dict:
    """The patcher's weights with its patches applied (comfy.lora.calculate_weight, in float32 as ModelPatcher
    patches them), as copies on the CPU: ComfyUI's own tensors are never shared or changed. fp16/bf16/fp32 weights
    keep their dtype (rounded once, as ComfyUI stores a patched weight); fp8 ones come back as fp16, so a LoRA delta
    is not rounded away into fp8's steps."""
    lora = _module("comfy.lora")
    out = {}
    for key, ((weight, convert), *patches) in patcher.get_key_patches(prefix or None).items():
        if key.rpartition(".")[2] in SCALE_LEAVES:
            continue
        value = weight.detach().to(torch.float32, copy=True)
        value = convert(value, inplace=True)
        if patches:
            value = lora.calculate_weight(patches, value, key)
        dtype = weight.dtype if weight.dtype in COMPUTABLE else torch.float16
        out[key[len(prefix):]] = value.to("cpu", dtype if value.is_floating_point() else value.dtype)
    return out
