"""The engine half of `python -m benchmarks.gpu`: per screenshot, full vs pruned, one request at a time,
the engine stepped here so that each step's StepStats (eager decode steps, CUDA graphs held) are seen
as the service's metrics see them; and the attention implementation of each phase."""

from __future__ import annotations

import sys
import time


def measure(engine, pixels, settings, instruction: str) -> dict:
    """One prepare + ground, the engine stepped here: every stage time (ms), end to end, decode per token,
    sizes, and from the steps' StepStats the decode steps run eagerly and the CUDA graphs held."""
    import torch

    from pixelprune.model.request import GroundRequest
    from pixelprune.model.step import Status

    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    steps = []
    sync()
    start = time.perf_counter()
    prepared = engine.prepare(pixels, settings)
    seq = engine.sequence(GroundRequest(prepared=prepared, instruction=instruction))
    engine.add(seq)
    while not engine.idle:
        engine.step(on_step=steps.append)
    sync()
    end_to_end = time.perf_counter() - start
    if seq.status is Status.FAILED:
        raise seq.error
    out = engine.output(seq)
    decoded = out.generated_tokens - 1
    return {**{f"{stage}_ms": ms for stage, ms in out.timings.ms().items()},
            "end_to_end_ms": end_to_end * 1000,
            "decode_ms_per_token": out.timings.decode_tokens * 1000 / decoded if decoded > 0 else None,
            "generated_tokens": out.generated_tokens, "kept_blocks": out.kept_blocks,
            "total_blocks": out.total_blocks, "kv_cache_bytes": out.kv_cache_bytes,
            "resized": list(prepared.resized_size), "eager_steps": sum(s.eager_steps for s in steps),
            "cuda_graphs": max((s.graphs for s in steps), default=0)}


def summarize(samples: list[dict]) -> dict:
    """Medians of the times over the runs, eager steps summed, graphs at most; the rest from the first run."""
    from benchmarks.gpu_server import median

    out = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if key.endswith("_ms") or key == "decode_ms_per_token":
            out[key] = median(values)
        else:
            out[key] = sum(values) if key == "eager_steps" else max(values) if key == "cuda_graphs" else first
    return out


def engine_part(engine, shots: dict, runs: int) -> list[dict]:
    from benchmarks.gpu_server import INSTRUCTION
    from pixelprune.settings import PruneSettings

    variants = (("full", PruneSettings(enabled=False)), ("pruned", PruneSettings()))
    rows = []
    for label, (pixels, how) in shots.items():
        samples: dict[str, list] = {"full": [], "pruned": []}
        for run in range(runs + 1):  # run 0 warms this shape up
            for variant, settings in variants:
                sample = measure(engine, pixels, settings, INSTRUCTION)
                if run:
                    samples[variant].append(sample)
        rows.append({"screenshot": label, "made_from": how, "size": [pixels.shape[1], pixels.shape[0]],
                     **{variant: summarize(values) for variant, values in samples.items()}})
        print(f"  engine: {label} done", file=sys.stderr)
    return rows


def attention_kernels(engine) -> dict:
    """The attention implementation of each phase, as the loaded model's configs name them."""
    config = engine.model.config
    text = config.text_config._attn_implementation
    return {"vit": config.vision_config._attn_implementation, "prefill": text, "decode": text,
            "decode_cuda_graphs": engine.device.type == "cuda" and engine.batch_settings.cuda_graphs,
            "compiled_mlps": engine.batch_settings.compile}
