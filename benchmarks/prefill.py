"""Prefill benchmark: full image vs PixelPrune on a mid-size Qwen3-VL with RANDOM weights, on CPU.

    python -m benchmarks.prefill [--runs 5] [--threads 2] [--images FILE ...] [--prefix-only]

The model is built in-process from a config (below) with random weights: the
times and cache sizes are those of real Qwen3-VL code (transformers'
Qwen3VLForConditionalGeneration) at that size, the generated text is meaningless.
Tokenizer, chat template and preprocessor config come from the tiny checkpoint
(`pixelprune.model.tiny`), so nothing is downloaded.

Per screenshot of the test corpus (tests/data/corpus), medians over --runs runs of:
  * preprocessing: the processor's full path (`processor(images=, text=)`) vs our
    pipeline (resize + select + patchify + tokenize, only kept blocks normalised);
  * ViT, LLM prefill (first token) and TTFT, keep-all vs pruned, both through
    GroundingEngine (keep-all through the adapter is the stock computation);
  * stock TTFT: processor + stock `model.generate` to the first token, no pixelprune code;
  * KV-cache bytes of the prompt (prompt tokens x bytes per token of the engine's cache);
  * the measured pruned/full time ratio next to pixelprune.flops' FLOPs ratio;
  * prefix reuse: TTFT of a pruned request on a new frame (ViT + whole prompt)
    next to a new instruction on the same frame (the cached prompt prefix: only the
    instruction's tokens are prefilled), both with the frame prepared again as the
    service does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

from pixelprune.model.engine import BatchSettings, GroundingEngine
from pixelprune.flops import ModelConfig, TextConfig, VisionConfig, estimate
from pixelprune.model.pipeline import PruneSettings, build_inputs, user_message
from pixelprune.points import grounding_prompt
from pixelprune.model.processor import load_processor
from pixelprune.model.tiny import TINY_CONFIG, write_tiny_checkpoint

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
DEFAULT_IMAGES = ("desktop_pcmanfm_xterm_mousepad_1920x1080.png", "web_python_tutorial_classes_1920x1080.png")
INSTRUCTION = "the Save button"
VISION = {"depth": 4, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "deepstack_visual_indexes": [1, 2, 3]}
TEXT = {"num_hidden_layers": 8, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 128,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}}


def build_model(seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """The mid-size Qwen3-VL: tiny's vocabulary and token ids, VISION/TEXT sizes, random weights."""
    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_config"].update(json.loads(json.dumps(VISION)), out_hidden_size=TEXT["hidden_size"])
    config["text_config"].update(json.loads(json.dumps(TEXT)))  # copies: the config class edits nested dicts
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).eval()


class FirstTokenClock(BaseStreamer):
    """Records when `generate` hands over the first new token (its first `put` is the prompt; the
    second is token 1, already on the host, so the device has finished)."""

    def __init__(self):
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def flops_config() -> ModelConfig:
    return ModelConfig(
        name="mid-size random Qwen3-VL (benchmarks/prefill.py)",
        vision=VisionConfig(depth=VISION["depth"], hidden_size=VISION["hidden_size"],
                            intermediate_size=VISION["intermediate_size"], out_hidden_size=TEXT["hidden_size"],
                            deepstack_layers=len(VISION["deepstack_visual_indexes"])),
        text=TextConfig(num_layers=TEXT["num_hidden_layers"], hidden_size=TEXT["hidden_size"],
                        intermediate_size=TEXT["intermediate_size"], num_heads=TEXT["num_attention_heads"],
                        num_kv_heads=TEXT["num_key_value_heads"], head_dim=TEXT["head_dim"]))


def stock_ttft(model, processor, image: Image.Image) -> tuple[float, float]:
    """(processor seconds, processor + stock generate-to-first-token seconds), no pixelprune code."""
    messages = user_message(grounding_prompt(INSTRUCTION))
    start = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    processed = time.perf_counter()
    clock = FirstTokenClock()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, streamer=clock)
    return processed - start, clock.first_token_at - start


def measure(engine: GroundingEngine, image: Image.Image, settings: PruneSettings) -> dict:
    """One grounding request; returns its stage times, kept/total blocks and KV bytes."""
    prepared = engine.prepare(np.asarray(image), settings)
    out = engine.ground(prepared, INSTRUCTION, max_new_tokens=1)
    stages = {name: getattr(out.timings, name) for name in ("resize", "select", "patchify", "vit", "prefill",
                                                               "decode_tokens", "ttft")}
    return {**stages, "kept": out.kept_blocks, "total": out.total_blocks, "kv": out.kv_cache_bytes,
            "resized": prepared.resized_size}


def pipeline_seconds(processor, image: Image.Image) -> float:
    inputs = build_inputs(processor, [image], user_message(grounding_prompt(INSTRUCTION)), PruneSettings())
    return inputs.timings.prepare + inputs.timings.tokenize


def run_image(engine, processor, path: Path, runs: int) -> dict:
    image = Image.open(path).convert("RGB")
    rows: dict[str, list] = {}
    for _ in range(runs):
        proc_s, stock_s = stock_ttft(engine.model, processor, image)
        full = measure(engine, image, PruneSettings(enabled=False))
        pruned = measure(engine, image, PruneSettings())
        for key, value in (("processor", proc_s), ("stock_ttft", stock_s), ("pipeline", pipeline_seconds(processor, image)),
                           *((f"full_{k}", v) for k, v in full.items()), *((f"pruned_{k}", v) for k, v in pruned.items())):
            rows.setdefault(key, []).append(value)
    return rows


def prefix_reuse(engine, path: Path, runs: int) -> dict:
    """Cold (new frame) vs vision-and-prefix hit (same frame and settings, new instruction) TTFT, pruned."""
    image = np.asarray(Image.open(path).convert("RGB"))
    rows: dict[str, list] = {}
    for run in range(runs):
        key = ("bench", path.name, run)  # a new frame every run
        cold = engine.ground(engine.prepare(image, PruneSettings()), INSTRUCTION, max_new_tokens=1, cache_key=key)
        hit = engine.ground(engine.prepare(image, PruneSettings()), "the File menu", max_new_tokens=1, cache_key=key)
        if cold.prefix_reused or not hit.prefix_reused:
            raise RuntimeError("the prefix cache did not behave: cold reused or hit missed")
        for name, value in (("cold_ttft", cold.timings.ttft), ("hit_ttft", hit.timings.ttft),
                            ("cold_model", cold.timings.vit + cold.timings.prefill),
                            ("hit_model", hit.timings.vit + hit.timings.prefill),
                            ("kept", cold.kept_blocks), ("total", cold.total_blocks)):
            rows.setdefault(name, []).append(float(value) if name.endswith(("ttft", "model")) else value)
    return rows


def prefix_table(results: dict[str, dict], reduce=statistics.median) -> str:
    lines = ["| screenshot | kept / total | TTFT new frame | TTFT same frame, new instruction | ratio | "
             "ViT + prefill new frame | prefill on the cached prefix | ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        r = aggregate(rows, reduce)
        lines.append(f"| {name} | {r['kept']} / {r['total']} | {r['cold_ttft'] * 1e3:.0f} ms | "
                     f"{r['hit_ttft'] * 1e3:.0f} ms | {r['hit_ttft'] / r['cold_ttft']:.2f} | "
                     f"{r['cold_model'] * 1e3:.0f} ms | {r['hit_model'] * 1e3:.0f} ms | "
                     f"{r['hit_model'] / r['cold_model']:.2f} |")
    return "\n".join(lines)


def aggregate(rows: dict[str, list], reduce) -> dict:
    """One value per key: `reduce` (median or min) over the runs for times, the first run otherwise."""
    return {key: (reduce(v) if isinstance(v[0], float) else v[0]) for key, v in rows.items()}


def table(results: dict[str, dict], text_tokens: int, reduce=statistics.median) -> str:
    cfg = flops_config()
    results = {name: aggregate(rows, reduce) for name, rows in results.items()}
    lines = ["| screenshot | resized | kept / total | preprocess: processor -> pipeline | ViT full -> pruned | "
             "LLM prefill full -> pruned | TTFT stock / keep-all / pruned | TTFT ratio pruned/stock | "
             "(ViT+prefill) ratio | FLOPs ratio | KV bytes full -> pruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        kept, total = r["pruned_kept"], r["pruned_total"]
        est = estimate(cfg, [r["pruned_resized"]], retain=kept / total, text_tokens=text_tokens, bytes_per_value=4)
        compute_ratio = (r["pruned_vit"] + r["pruned_prefill"]) / (r["full_vit"] + r["full_prefill"])
        w, h = r["pruned_resized"]
        lines.append(
            f"| {name} | {w}x{h} | {kept} / {total} ({kept / total:.1%}) | {r['processor'] * 1e3:.0f} ms -> "
            f"{r['pipeline'] * 1e3:.0f} ms | {r['full_vit']:.2f} s -> {r['pruned_vit']:.2f} s | "
            f"{r['full_prefill']:.2f} s -> {r['pruned_prefill']:.2f} s | {r['stock_ttft']:.2f} / "
            f"{r['full_ttft']:.2f} / {r['pruned_ttft']:.2f} s | {r['pruned_ttft'] / r['stock_ttft']:.2f} | "
            f"{compute_ratio:.2f} | {1 / est.flops_speedup:.2f} | "
            f"{r['full_kv'] / 2**20:.1f} MiB -> {r['pruned_kv'] / 2**20:.1f} MiB ({r['pruned_kv'] / r['full_kv']:.2f}) |")
    return "\n".join(lines)


def full_vs_pruned(engine, processor, args) -> None:
    results = {}
    for name in args.images:
        path = Path(name) if Path(name).exists() else CORPUS / name
        results[path.name] = run_image(engine, processor, path, args.runs)
        print(f"  done {path.name}", file=sys.stderr)
    prompt_len = len(processor.tokenizer(processor.apply_chat_template(
        user_message(grounding_prompt(INSTRUCTION)), tokenize=False, add_generation_prompt=True))["input_ids"]) - 1
    print(f"Text tokens per prompt: {prompt_len}. Full and pruned runs alternate.\n")
    print(f"Medians over {args.runs} runs:\n")
    print(table(results, prompt_len, statistics.median))
    print(f"\nMinima over {args.runs} runs (least disturbed by other processes on the machine):\n")
    print(table(results, prompt_len, min))



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per screenshot; medians and minima are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), help="corpus file names or paths")
    parser.add_argument("--prefix-only", action="store_true", help="only the prefix-reuse comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_tiny_checkpoint(Path(tmp) / "tiny"))
    model = build_model()
    engine = GroundingEngine(model, processor, max_new_tokens=1, is_random_weights=True,
                             batch=BatchSettings(max_batch_tokens=16384))
    params = sum(p.numel() for p in model.parameters())
    print(f"Model: Qwen3-VL layout with RANDOM weights, {params / 1e6:.1f} M parameters, float32, CPU, "
          f"{args.threads} threads, attn sdpa\n  vision: {VISION}\n  text: {TEXT}\n")
    engine.warmup()
    if not args.prefix_only:
        full_vs_pruned(engine, processor, args)
    reuse = {}
    for name in args.images:
        path = Path(name) if Path(name).exists() else CORPUS / name
        reuse[path.name] = prefix_reuse(engine, path, args.runs)
    print(f"\nPrefix reuse, pruned (TTFT includes resize + select + patchify of the frame), medians over "
          f"{args.runs} runs:\n")
    print(prefix_table(reuse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
