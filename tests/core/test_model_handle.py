"""core/model_handle.py: components adopt file tensors (no copies when nothing changes), release and
read again, sizes from tensors, the headless memory policy."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.checkpoints import load_state_dict
from flipbook_pack.core.errors import UnsupportedCheckpointError
from flipbook_pack.core.model_handle import Component, LocalMemory, ModelHandle, adopt_tensors, tensor_bytes
from flipbook_pack.core.tiny_weights import write_safetensors

CPU = torch.device("cpu")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def _file(tmp_path, dtype=torch.bfloat16):
    state = {"proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3), "norm.weight": torch.ones(3),
             "norm.bias": torch.zeros(3), "steps": torch.tensor([3, 4])}
    return write_safetensors(state, tmp_path / "net.safetensors", dtype=dtype), state


def _component(path, dtype=None, **kw):
    with torch.device("meta"):
        module = Net()
    return Component(name="net", module=module, weights=lambda: load_state_dict(path), load_device=CPU,
                     offload_device=CPU, dtype=dtype, **kw)


def test_storage_dtype_is_kept_and_file_tensors_are_adopted_without_copies(tmp_path):
    path, state = _file(tmp_path)
    component = _component(path)
    assert not component.resident and component.size_bytes == 0
    file_tensors = load_state_dict(path)
    adopt_tensors(component.module, file_tensors, device=CPU, dtype=None, what="net")
    assert component.module.proj.weight.data_ptr() == file_tensors["proj.weight"].data_ptr()  # the mmap itself
    assert component.module.proj.weight.dtype == torch.bfloat16 and not component.module.proj.weight.requires_grad
    component.materialize()
    assert component.resident and component.size_bytes == 12 * 2 + 3 * 2 * 3 + 2 * 8
    torch.testing.assert_close(component.module.proj.weight.float(), state["proj.weight"].bfloat16().float())


def test_compute_dtype_converts_floats_only(tmp_path):
    path, _ = _file(tmp_path)
    component = _component(path, dtype=torch.float32)
    component.materialize()
    assert component.module.proj.weight.dtype == torch.float32 and component.module.steps.dtype == torch.int64
    assert component.module.steps.tolist() == [3, 4]


def test_release_frees_and_load_reads_the_same_weights_again(tmp_path):
    path, _ = _file(tmp_path)
    component = _component(path, dtype=torch.float32)
    component.materialize()
    x = torch.randn(2, 4)
    before = component.module.norm(component.module.proj(x))
    size = component.size_bytes
    component.release()
    assert not component.resident and component.module.proj.weight.device.type == "meta"
    assert component.size_bytes == size  # remembered for the memory manager
    component.load()
    torch.testing.assert_close(component.module.norm(component.module.proj(x)), before)


def test_mismatched_files_report_every_name_at_once(tmp_path):
    path, state = _file(tmp_path)
    state = {("proj.weights" if k == "proj.weight" else k): v for k, v in state.items()}
    bad = write_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=r"1 missing tensors \(e.g. \['proj.weight'\]\), "
                                                          r"1 unexpected \(e.g. \['proj.weights'\]\)"):
        _component(bad).materialize()


def test_state_no_file_holds_must_be_rebuilt(tmp_path):
    path, state = _file(tmp_path)
    partial = write_safetensors({k: v for k, v in state.items() if k != "steps"}, tmp_path / "partial.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="1 tensors unset"):
        _component(partial, ignore=("steps",)).materialize()

    def rebuild(module):
        module.register_buffer("steps", torch.tensor([3, 4]))

    component = _component(partial, ignore=("steps",), finish=rebuild)
    component.materialize()
    assert component.module.steps.tolist() == [3, 4]


def test_tensor_bytes_counts_shared_storage_once():
    layer = torch.nn.Linear(4, 4, bias=False)
    twin = torch.nn.Sequential(layer, layer)
    assert tensor_bytes(twin) == 16 * 4


class FakeComponent:
    """Records moves; devices are labels (the policy only compares them)."""

    def __init__(self, name, size, device="cuda", resident=True, moves=None):
        self.name, self.size_bytes, self.resident = name, size, resident
        self.load_device, self.offload_device = torch.device("cuda"), CPU
        self.device = torch.device(device)
        self.moves = moves

    def load(self):
        self.moves.append(("load", self.name))
        self.device, self.resident = self.load_device, True

    def offload(self):
        self.moves.append(("offload", self.name))
        self.device = self.offload_device


def test_local_policy_offloads_others_only_when_short_of_room():
    moves = []
    text, unet, vae = (FakeComponent("text", 10, moves=moves), FakeComponent("unet", 100, device="cpu", moves=moves),
                       FakeComponent("vae", 10, moves=moves))
    handle = ModelHandle({"text": text, "unet": unet, "vae": vae})
    LocalMemory(handle, free_bytes=lambda device: 1000).prepare([unet], working_bytes=50)
    assert moves == [("load", "unet")]  # plenty of room: nothing else moves
    moves.clear()
    free = {"cuda": 40}
    unet.device = CPU

    def free_bytes(device):
        return free["cuda"]

    def offload_frees(component):
        real = component.offload

        def offload():
            real()
            free["cuda"] += component.size_bytes * 20
        component.offload = offload

    for c in (text, vae):
        offload_frees(c)
    LocalMemory(handle, free_bytes=free_bytes).prepare([unet], working_bytes=50)
    assert moves == [("offload", "text"), ("load", "unet")]  # one offload made enough room; the VAE stays


def test_a_half_materialized_component_is_not_resident(tmp_path):
    path, _ = _file(tmp_path)
    component = _component(path)
    component.materialize()
    component.module.norm.to(torch.device("meta"))
    assert not component.resident
    component.load()  # reads everything again
    assert component.resident and component.module.norm.weight.device == CPU


def test_tied_weights_share_one_adopted_tensor():
    """T5's `shared` and `encoder.embed_tokens` are one parameter: a file with either name fills both, once."""
    from transformers import UMT5Config, UMT5EncoderModel


    config = UMT5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2)
    with torch.device("meta"):
        module = UMT5EncoderModel(config)
    weights = {k: torch.randn(v.shape) for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    adopt_tensors(module, weights, device=torch.device("cpu"), dtype=None, what="text encoder")
    assert module.shared.weight is module.encoder.embed_tokens.weight
    assert torch.equal(module.shared.weight, weights["shared.weight"])


def test_kept_storage_dtypes_are_not_cast():
    from flipbook_pack.core.model_handle import FP8_DTYPES

    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    weights = {"0.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "0.bias": torch.randn(4),
               "1.weight": torch.ones(4), "1.bias": torch.zeros(4)}
    adopt_tensors(module, weights, device=torch.device("cpu"), dtype=torch.bfloat16, what="x", keep_dtypes=FP8_DTYPES)
    assert module[0].weight.dtype == torch.float8_e4m3fn and module[0].bias.dtype == torch.bfloat16
