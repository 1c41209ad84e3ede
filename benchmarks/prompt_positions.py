"""Host time of building one pruned prompt's token ids and 4-row positions, two ways, on the CPU:

    python -m benchmarks.prompt_positions [--runs 200] [--threads 1]

* "get_rope_index": what the engine's prompt building does today: expand the chat's image
  placeholder to the full grid's tokens (`pipeline.tokenize`), then `prune_token_inputs`
  (transformers' `get_rope_index` on the FULL sequence: a `.tolist()` and a Python groupby,
  then a gather of the kept columns);
* "host numpy": `positions.pruned_prompt_positions` on the chat's ids, the grid and the keep
  mask, then `torch.from_numpy` (what a device path would copy up in one transfer).

Both run on CPU tensors here. On CUDA the first also waits for the device at its `.tolist()`
(a sync on the critical path) and runs its gathers as kernels; that part is not measured here.
Sizes: the 1080p desktop (1920x1088, 2040 blocks) and the 4K web page (3840x2176, 8160 blocks)
at the keep shares the H200 run measured (1312 / 2040 and 1923 / 8160), with keep masks of that
share drawn at random (the time does not depend on which blocks). The tiny checkpoint's config
and chat template (token layout and merge size are the 2B's). Both outputs are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = (("1920x1080 desktop", (1, 68, 120), 1312), ("3840x2160 web page", (1, 136, 240), 1923))


def timed(fn, runs: int) -> float:
    """Median milliseconds of `runs` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForImageTextToText

    from pixelprune.model.pipeline import chat_token_ids, tokenize, user_message
    from pixelprune.model.positions import prune_token_inputs, pruned_prompt_positions
    from pixelprune.model.processor import load_processor
    from pixelprune.model.tiny import write_tiny_checkpoint

    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_positions", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="timed calls per size and way (200)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp), seed=0)
        model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
        processor = load_processor(checkpoint)
    chat = chat_token_ids(processor, user_message("Click the Save button."))
    print("| screenshot | kept / total blocks | get_rope_index path (ms) | host numpy (ms) | saved (ms) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, grid, kept in SIZES:
        blocks = np.zeros(grid[1] * grid[2] // 4, dtype=bool)
        blocks[np.random.default_rng(0).choice(blocks.size, kept, replace=False)] = True
        mask = blocks.reshape(grid[1] // 2, grid[2] // 2)

        def old():
            full = tokenize(processor, None, [grid], ids=chat)
            kwargs, _ = prune_token_inputs(model, full["input_ids"], None, None, torch.tensor([grid]), [mask])
            return kwargs["input_ids"][0], kwargs["position_ids"][:, 0]

        def new():
            ids, positions = pruned_prompt_positions(model.config, chat, [grid], [mask])
            return torch.from_numpy(ids), torch.from_numpy(positions)

        (ids_a, pos_a), (ids_b, pos_b) = old(), new()
        if not (torch.equal(ids_a, ids_b) and torch.equal(pos_a, pos_b)):
            raise SystemExit(f"{label}: the two ways differ")
        before, after = timed(old, args.runs), timed(new, args.runs)
        print(f"| {label} | {kept} / {blocks.size} | {before:.3f} | {after:.3f} | {before - after:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
