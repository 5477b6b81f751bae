"""Loading benchmark: peak resident memory while loading a checkpoint, divided by the file's size.

Each measurement runs in a fresh child process: import everything, reset the kernel's peak-RSS
counter (/proc/self/clear_refs, Linux), load, read the peak (VmHWM). The figure is
(peak RSS - RSS before loading) / file size, right after loading and again once every weight has been
read (memory-mapped pages become resident when first read); goal <= 1.1 for a bf16 file loaded to the CPU in bf16
(the storage dtype is kept, tensors are memory-mapped and adopted without copies).
`--compare DIR` measures another checkout of the pack (e.g. a `git worktree` of an older commit)
in the same run, side by side.

    python bench/loading.py --size real                      # SD1.5 widths: a 2.1 GB bf16 file
    python bench/loading.py --size real --compare /tmp/old   # and an older checkout, side by side
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib.util, json, sys, time
import torch
root, path, dtype_name, what = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("fbpack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["fbpack"] = pack; spec.loader.exec_module(pack)
from fbpack.lightning import sd15_checkpoint as S
import diffusers, transformers  # imported before the baseline is taken
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS:")
start = time.perf_counter()
parts = S.load_sd15_checkpoint(path, dtype=getattr(torch, dtype_name), device="cpu")
seconds = time.perf_counter() - start
loaded = status("VmHWM:")
for module in (parts.unet, parts.vae, parts.text_encoder):  # read every byte once (mapped pages become resident)
    for tensor in (*module.parameters(), *module.buffers()):
        tensor.detach().reshape(-1).view(torch.uint8).max()
print(json.dumps({"before": before, "peak": loaded, "touched": status("VmHWM:"), "seconds": seconds}))
"""


def write_checkpoint(path: Path, size: str, dtype) -> Path:
    sys.path.insert(0, str(ROOT.parent))
    import importlib.util

    spec = importlib.util.spec_from_file_location("fbpack_writer", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fbpack_writer"] = pack
    spec.loader.exec_module(pack)
    from fbpack_writer.lightning import tiny_models as T

    sizes = T.SD15_REAL_SIZES if size == "real" else T.TinySizes(
        unet_channels=(64, 128, 256, 256), vae_channels=(64, 128, 128, 128), vae_layers=2, text_hidden=128,
        text_layers=4)
    return T.write_safetensors(T.tiny_sd15_state_dict(sizes), path, dtype=dtype)


def measure(pack_root: Path, checkpoint: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(pack_root), str(checkpoint), dtype, "sd15"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["small", "real"], default="real")
    parser.add_argument("--compare", help="another checkout of the pack to measure side by side")
    args = parser.parse_args()
    import torch

    packs = [("this checkout", ROOT)] + ([("compare " + args.compare, Path(args.compare))] if args.compare else [])
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        for file_dtype, load_dtype in (("bfloat16", "bfloat16"), ("float16", "float32")):
            path = write_checkpoint(Path(scratch) / f"sd15_{file_dtype}.safetensors", args.size,
                                    getattr(torch, file_dtype))
            size = os.path.getsize(path)
            # every checkout is measured twice, alternating, and the second round is reported: the first read
            # of a freshly written file pays for the page cache, whichever checkout comes first
            rounds = [{label: measure(root, path, load_dtype) for label, root in packs} for _ in range(2)]
            for label, root in packs:
                m = rounds[-1][label]
                loaded, touched = ((m[k] - m["before"]) / size for k in ("peak", "touched"))
                lines.append(f"{label}: {file_dtype} file ({size / 2**30:.2f} GiB) -> CPU {load_dtype}: peak RSS "
                             f"{loaded:.2f} x file after loading, {touched:.2f} x file once every weight was read; "
                             f"{m['seconds']:.1f} s")
            path.unlink()
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
