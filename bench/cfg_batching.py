"""CFG batching benchmark: prompts of very different lengths must not cost more than running them apart.

At CFG > 1 the prompt and negative are evaluated together when their contexts can be padded to a
common length cheaply (at most 4x, as ComfyUI), else one after the other. Measured side by side in
one run on tiny real-layout models (CPU): 28 prompt chunks against 27 negative chunks, and against
1; goal: the first within 2x of the second. `--with-lcm` also times the old behaviour (both padded to
the least common multiple, 756 chunks) for reference.

    python bench/cfg_batching.py [--with-lcm]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path


def load_pack():
    """The pack as `flipbook_bench`, loaded by bench/lightning.py's loader (as ComfyUI loads it)."""
    spec = importlib.util.spec_from_file_location("bench_lightning", Path(__file__).with_name("lightning.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.load_pack()


def chunked_text(chunks: int, word: str) -> str:
    return " ".join([word] * (75 * chunks - 5))  # one token a word: `chunks` chunks of 75 tokens


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--with-lcm", action="store_true")
    args = parser.parse_args()
    load_pack()
    import torch

    from flipbook_bench.lightning import pipeline as P
    from flipbook_bench.lightning import tiny_models as T

    with tempfile.TemporaryDirectory() as scratch:
        ckpt = T.write_safetensors(T.tiny_sd15_state_dict(), Path(scratch) / "sd15.safetensors")
        motion = T.write_safetensors(T.tiny_motion_state_dict(),
                                     Path(scratch) / "animatediff_lightning_4step_comfyui.safetensors")
        model = P.load_lightning(ckpt, motion, device="cpu")
    prompt = chunked_text(28, "fox")
    cases = {"28 vs 27 chunks": chunked_text(27, "blurry"), "28 vs 1 chunk": "blurry"}
    times, forwards = {}, {}
    for _ in range(2):  # the first round warms up
        for name, negative in cases.items():
            request = P.GenerationRequest(prompt=prompt, negative=negative, frames=8, width=64, height=64, cfg=1.5)
            start = time.perf_counter()
            result = P.generate(model, request)
            times[name], forwards[name] = time.perf_counter() - start, result.model_forwards
    lines = [f"{name}: {times[name]:.2f} s, {forwards[name]} UNet forwards" for name in cases]
    ratio = times["28 vs 27 chunks"] / times["28 vs 1 chunk"]
    lines.append(f"28-vs-27 / 28-vs-1 = {ratio:.2f}  (goal <= 2)")
    if args.with_lcm:
        original = P.join_contexts
        P.join_contexts = lambda contexts: torch.cat(P.match_lengths(contexts))
        try:
            request = P.GenerationRequest(prompt=prompt, negative=cases["28 vs 27 chunks"], frames=8, width=64,
                                          height=64, cfg=1.5)
            start = time.perf_counter()
            P.generate(model, request)
            lines.append(f"old behaviour, both padded to 756 chunks: {time.perf_counter() - start:.2f} s")
        finally:
            P.join_contexts = original
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
