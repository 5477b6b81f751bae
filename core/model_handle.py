"""The components of a loaded model and where their weights live.

A `Component` is one network (a UNet with its motion module, a text encoder, a VAE, later a Wan
transformer) with the device it computes on, the device it waits on, its dtype and its size in
bytes, read from its tensors. Its weights come from a `weights` function that reads them from the
user's files and returns them under the module's own names; the component adopts those tensors
(no random init, no second copy) and can `release` them and read them again later. A
`ModelHandle` groups the components of one model. Nothing here knows ComfyUI: `nodes/_comfy.py`
hands the same components to ComfyUI's memory manager, and `LocalMemory` is the small policy
used headless (load what the next step needs, offload what it does not).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Protocol

import torch

from .errors import UnsupportedCheckpointError

log = logging.getLogger(__name__)

WeightsFn = Callable[[], Mapping[str, torch.Tensor]]
META = torch.device("meta")


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once), whatever device they are on."""
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        key = (tensor.device, tensor.data_ptr()) if tensor.device != META else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


FP8_DTYPES = frozenset(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied weights, e.g. T5's `shared` and
    `encoder.embed_tokens`): a file holds one of them, and all of them get the one adopted tensor."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def adopt_tensors(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], *, device: torch.device,
                  dtype: Optional[torch.dtype], what: str, ignore: tuple[str, ...] = (),
                  keep_dtypes: frozenset = frozenset()) -> None:
    """Make `module` use these tensors, each moved to device/dtype as it is adopted (dtype None keeps the
    storage dtype; tensors stored in one of `keep_dtypes`, e.g. fp8 weights cast per layer at forward, keep
    theirs). Every name must match (but those ending in `ignore`; for tied weights one name of the group):
    all mismatches are reported at once."""
    groups = _tied_groups(module)
    known = {name for group in groups for name in group}
    missing = sorted(group[0] for group in groups
                     if not any(n in weights for n in group) and not group[0].endswith(ignore))
    unexpected = sorted(k for k in weights if k not in known and not k.endswith(ignore))
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"The {what} does not match its architecture: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it the right model in a known file layout?"
        )

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype not in keep_dtypes
        return tensor.to(device=device, dtype=dtype if cast else tensor.dtype)

    # every tensor is moved first and assigned after, so a failure (out of memory, a bad file) leaves the
    # module as it was instead of half loaded
    values = [(group, moved(weights[next(n for n in group if n in weights)]))
              for group in groups if any(n in weights for n in group)]
    for group, value in values:
        shared = None
        for name in group:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                shared = shared if shared is not None else torch.nn.Parameter(value, requires_grad=False)
                owner._parameters[leaf] = shared
            else:
                owner._buffers[leaf] = value


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(iter((*module.parameters(), *module.buffers())), None)
    return first.device if first is not None else torch.device("cpu")


def return_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it for reuse otherwise: after
    releasing a 1 GB model the process RSS fell by 0.56 GB without this and by 1.06 GB with it)."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc (Linux); others return memory themselves
        libc.malloc_trim(0)


@dataclass(eq=False)
class Component:
    """One network of a loaded model. `module` is built on the meta device; `materialize` adopts its weights."""

    name: str  # "unet", "text_encoder", "vae", ...
    module: torch.nn.Module
    weights: WeightsFn
    load_device: torch.device  # where it computes
    offload_device: torch.device  # where it waits between uses
    dtype: Optional[torch.dtype]  # compute/storage dtype of its floating tensors (None: the file's)
    finish: Optional[Callable[[torch.nn.Module], None]] = None  # rebuilds state no file holds (e.g. ids)
    ignore: tuple[str, ...] = ()  # name endings that may be absent from the files (recomputed by `finish`)
    keep_dtypes: frozenset = frozenset()  # storage dtypes adopted as they are (fp8 weights cast per layer)
    size_bytes: int = 0  # from the tensors, kept while released
    reads: int = 0  # times the weights were read from the files (state derived from them is per read)

    @property
    def resident(self) -> bool:
        """Whether all weights are in memory (False after `release`, until the next `load`)."""
        return not any(t.device == META for t in (*self.module.parameters(), *self.module.buffers()))

    @property
    def device(self) -> torch.device:
        return _device_of(self.module)

    def materialize(self, device: Optional[torch.device] = None) -> None:
        """Read the weights from the files onto `device` (default: the offload device)."""
        device = device or self.offload_device
        adopt_tensors(self.module, self.weights(), device=device, dtype=self.dtype, what=self.name,
                      ignore=self.ignore, keep_dtypes=self.keep_dtypes)
        if self.finish is not None:
            self.finish(self.module)
        stray = [n for n, t in (*self.module.named_parameters(), *self.module.named_buffers()) if t.device == META]
        if stray:
            raise UnsupportedCheckpointError(f"The {self.name} files leave {len(stray)} tensors unset: {stray[:3]}.")
        self.size_bytes = tensor_bytes(self.module)
        self.reads += 1

    def restore(self, device: torch.device) -> None:
        """Read the weights from the files again onto `device` if they were released (else nothing)."""
        if not self.resident:
            log.info("reading %s weights again from the file (%.0f MB)", self.name, self.size_bytes / 2**20)
            self.materialize(device)

    def load(self) -> None:
        """Weights on the compute device (read again from the files if they were released)."""
        self.restore(self.load_device)
        if self.device != self.load_device:
            self.module.to(self.load_device)

    def offload(self) -> None:
        if self.resident and self.device != self.offload_device:
            self.module.to(self.offload_device)

    def release(self) -> None:
        """Drop the weights from memory; the next `load` reads them from the files again."""
        if self.resident:
            self.module.to(META)
            return_freed_memory()


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """The components of one loaded model, by name, in the order they are used."""

    components: Mapping[str, Component]

    def __getitem__(self, name: str) -> Component:
        return self.components[name]


class MemoryPolicy(Protocol):
    """Puts the named components on their compute device before a step that uses them."""

    def prepare(self, components: Iterable[Component], working_bytes: int = 0) -> None: ...


def free_device_bytes(device: torch.device) -> int:
    """Bytes a new tensor can still take on `device` (CUDA: free plus PyTorch's cached blocks)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return 1 << 62  # the CPU: the operating system decides


class LocalMemory:
    """Headless policy: load what the next step needs; offload others on that device only while short of room."""

    def __init__(self, handle: ModelHandle, free_bytes: Callable[[torch.device], int] = free_device_bytes) -> None:
        self.handle = handle
        self.free_bytes = free_bytes

    def prepare(self, components: Iterable[Component], working_bytes: int = 0) -> None:
        wanted = list(components)
        for device in {c.load_device for c in wanted}:
            needed = working_bytes + sum(c.size_bytes for c in wanted
                                         if c.load_device == device and not (c.resident and c.device == device))
            for other in self.handle.components.values():
                if needed <= self.free_bytes(device):
                    break
                if other not in wanted and other.resident and other.device == device != other.offload_device:
                    log.info("offloading %s to make room on %s", other.name, device)
                    other.offload()
        for component in wanted:
            component.load()
