"""Prefill FLOPs and KV-cache bytes of Qwen3-VL, full image vs PixelPrune
(the paper's Appendix E model; `pixelprune estimate`).

For one image of N ViT patches (N = h*w / 16^2), m = 2 (spatial merge), T text
tokens, and FLOPs = 2 per multiply-add:

    ViT     L_v * (2 N (4 d^2 + 2 d f_v) + 4 N^2 d)          per image
            QKV + output projections and the two FFN layers per token; the
            attention maps (Q K^T and A V) are quadratic in N, per image.
    Merger  K * (N / m^2) * 2 (D_m^2 + D_m d_out),  D_m = m^2 d, K = 1 + #DeepStack
            fc1 D_m -> D_m and fc2 D_m -> d_out, once for the main merger and once
            per DeepStack merger.
    LLM     L * (S C_tok + 4 S^2 n_q d_h),   S = sum(N_i) / m^2 + T
            C_tok = 2 (2 d n_q d_h + 2 d n_kv d_h + 3 d f)   (GQA: Q and output
            are d x n_q d_h, K and V are d x n_kv d_h; SwiGLU has 3 matrices)
    KV      2 * L * n_kv * d_h * S * bytes_per_value

Attention in the ViT is computed per image (`cu_seqlens`), so a multi-page
document pays sum_i N_i^2 in the ViT, while the LLM sees all pages as one long
sequence and pays S^2. PixelPrune replaces N by the kept patch count N' = 4 K:
ViT attention shrinks quadratically, its linear part, the mergers and the LLM
linear part linearly, LLM attention quadratically in S'. Patch embedding,
norms, RoPE and the LM head (one position at prefill) are left out, as in the
paper.

Checked against Table 4 (Qwen3-VL-2B) in tests/pixelprune/test_flops.py. The
paper does not state the inputs behind its means; these documented choices
land within 10 % of both the full and the pruned numbers:
- ScreenSpot-Pro Scientific, 70 -> 11 TFLOPs at 26.2 %: one 2880x1800 screenshot
  (-> 2880x1792, 5040 blocks) and 100 text tokens (chat template + instruction):
  73.7 -> 10.7 TFLOPs.
- MMLongBench-Doc, 2694 -> 762 TFLOPs at 50.3 %: 43 US-letter pages rendered at
  150 dpi (1275x1650 -> 1280x1664, 2080 blocks each; the benchmark's documents
  average 47.5 pages) and 100 text tokens: 2618 -> 785 TFLOPs.
Table 4's KV-cache column is measured GPU memory, not this formula's bytes.
"""

from __future__ import annotations

import argparse
import json
import numbers
from dataclasses import asdict, dataclass
from typing import Sequence

from pixelprune.geometry import BLOCK_SIZE, MERGE_SIZE, PATCH_SIZE, smart_resize

MAX_IMAGES = 100_000  # --images bound: a prompt of more pages than this is not a real input


@dataclass(frozen=True)
class VisionConfig:
    depth: int  # ViT blocks (L_v)
    hidden_size: int  # d
    intermediate_size: int  # ViT FFN width (f_v), a plain 2-layer GELU MLP
    out_hidden_size: int  # merger output = LLM hidden size (d_out)
    deepstack_layers: int  # DeepStack mergers, each one more merger pass


@dataclass(frozen=True)
class TextConfig:
    num_layers: int  # decoder layers (L)
    hidden_size: int  # d
    intermediate_size: int  # SwiGLU width (f)
    num_heads: int  # query heads (n_q)
    num_kv_heads: int  # key/value heads (n_kv, GQA)
    head_dim: int  # d_h


@dataclass(frozen=True)
class ModelConfig:
    name: str  # Hugging Face id
    vision: VisionConfig
    text: TextConfig


# Values from the released config.json files of the Qwen/Qwen3-VL-*-Instruct
# checkpoints on the Hugging Face Hub (2B: also the paper's Appendix E and
# design/QWEN3VL.md). 4B and 8B were read from public vendored copies of those
# config.json files (transformers_version 4.57.0.dev0), several agreeing copies
# found with the project's code search, not fetched from the Hub.
QWEN3_VL_2B = ModelConfig(
    "Qwen/Qwen3-VL-2B-Instruct",
    VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048, deepstack_layers=3),
    TextConfig(num_layers=28, hidden_size=2048, intermediate_size=6144, num_heads=16, num_kv_heads=8, head_dim=128))
QWEN3_VL_4B = ModelConfig(
    "Qwen/Qwen3-VL-4B-Instruct",
    VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560, deepstack_layers=3),
    TextConfig(num_layers=36, hidden_size=2560, intermediate_size=9728, num_heads=32, num_kv_heads=8, head_dim=128))
QWEN3_VL_8B = ModelConfig(
    "Qwen/Qwen3-VL-8B-Instruct",
    VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096, deepstack_layers=3),
    TextConfig(num_layers=36, hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8, head_dim=128))
MODELS = {"2b": QWEN3_VL_2B, "4b": QWEN3_VL_4B, "8b": QWEN3_VL_8B}

PATCHES_PER_BLOCK = MERGE_SIZE * MERGE_SIZE
TERA = 1e12


def vit_flops(vision: VisionConfig, patches: int) -> int:
    """ViT FLOPs for one image of `patches` patches (attention within the image)."""
    d, n = vision.hidden_size, patches
    return vision.depth * (2 * n * (4 * d * d + 2 * d * vision.intermediate_size) + 4 * n * n * d)


def merger_flops(vision: VisionConfig, patches: int) -> int:
    """Main merger + DeepStack mergers on `patches` patches (patches / 4 tokens)."""
    dm = PATCHES_PER_BLOCK * vision.hidden_size
    tokens = patches // PATCHES_PER_BLOCK
    return (1 + vision.deepstack_layers) * tokens * 2 * (dm * dm + dm * vision.out_hidden_size)


def llm_flops(text: TextConfig, sequence: int) -> int:
    """Decoder prefill FLOPs over one sequence of `sequence` tokens."""
    d, q, kv = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    per_token = 2 * (2 * d * q + 2 * d * kv + 3 * d * text.intermediate_size)
    return text.num_layers * (sequence * per_token + 4 * sequence * sequence * q)


def kv_cache_bytes(text: TextConfig, sequence: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `sequence` tokens (bf16: 2 bytes)."""
    return 2 * text.num_layers * text.num_kv_heads * text.head_dim * sequence * bytes_per_value


@dataclass(frozen=True)
class Cost:
    patches: int  # ViT patches over all images
    visual_tokens: int  # blocks reaching the LLM (patches / 4)
    sequence_length: int  # LLM prefill tokens: visual + text
    vit_tflops: float  # ViT, attention per image
    merger_tflops: float  # main merger + DeepStack mergers
    llm_tflops: float  # decoder prefill
    kv_cache_bytes: int  # KV cache after prefill

    @property
    def total_tflops(self) -> float:
        return self.vit_tflops + self.merger_tflops + self.llm_tflops


@dataclass(frozen=True)
class Estimate:
    model: str  # Hugging Face id
    images: int  # images (pages) in the prompt
    text_tokens: int  # non-visual prompt tokens
    retain_ratio: float  # kept / total visual tokens over all images
    full: Cost  # every block
    pruned: Cost  # PixelPrune's kept blocks only

    @property
    def flops_speedup(self) -> float:
        return self.full.total_tflops / self.pruned.total_tflops

    @property
    def kv_cache_saving(self) -> float:
        return 1.0 - self.pruned.kv_cache_bytes / self.full.kv_cache_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("full", "pruned"):
            out[key]["total_tflops"] = getattr(self, key).total_tflops
        out["flops_speedup"], out["kv_cache_saving"] = self.flops_speedup, self.kv_cache_saving
        return out


def _cost(model: ModelConfig, patches: Sequence[int], text_tokens: int, bytes_per_value: int) -> Cost:
    tokens = sum(patches) // PATCHES_PER_BLOCK
    seq = tokens + text_tokens
    # ViT attention is quadratic *per image* (cu_seqlens separates images), so the
    # ViT is summed page by page; the LLM attends over all pages + text at once.
    return Cost(
        patches=sum(patches), visual_tokens=tokens, sequence_length=seq,
        vit_tflops=sum(vit_flops(model.vision, n) for n in patches) / TERA,
        merger_tflops=sum(merger_flops(model.vision, n) for n in patches) / TERA,
        llm_tflops=llm_flops(model.text, seq) / TERA,
        kv_cache_bytes=kv_cache_bytes(model.text, seq, bytes_per_value))


def _patch_count(image) -> int:
    if isinstance(image, numbers.Integral) and not isinstance(image, bool):
        image = int(image)
        if image <= 0 or image % PATCHES_PER_BLOCK:
            raise ValueError(f"a patch count must be a positive multiple of {PATCHES_PER_BLOCK}, got {image}")
        return image
    try:
        width, height = (int(v) for v in image)
    except (TypeError, ValueError):
        raise ValueError(f"an image is a (width, height) pair or a patch count, got {image!r}") from None
    if width <= 0 or height <= 0 or width % BLOCK_SIZE or height % BLOCK_SIZE:
        raise ValueError(f"image size must be positive multiples of {BLOCK_SIZE} (after smart_resize), "
                         f"got {width}x{height}")
    return (width // PATCH_SIZE) * (height // PATCH_SIZE)


def estimate(model: ModelConfig | str, images: Sequence, retain: float | Sequence[float] = 1.0,
             text_tokens: int = 0, bytes_per_value: int = 2) -> Estimate:
    """Full vs pruned prefill cost of one prompt with `images` (each a (w, h)
    size after smart_resize, or a ViT patch count) and `text_tokens` text
    tokens. `retain` is one kept-block ratio for all images or one per image;
    an image keeps round(ratio * blocks) blocks, at least 1 (the anchor)."""
    if isinstance(model, str):
        if model.lower() not in MODELS:
            raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
        model = MODELS[model.lower()]
    patches = [_patch_count(image) for image in images]
    if not patches:
        raise ValueError("at least one image is needed")
    ratios = [float(retain)] * len(patches) if isinstance(retain, numbers.Real) else [float(r) for r in retain]
    if len(ratios) != len(patches):
        raise ValueError(f"got {len(ratios)} retain ratios for {len(patches)} images")
    if any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"retain ratios must be in (0, 1], got {ratios}")
    if text_tokens < 0 or bytes_per_value <= 0:
        raise ValueError("text_tokens must be >= 0 and bytes_per_value > 0")
    kept = [max(1, round(r * (n // PATCHES_PER_BLOCK))) * PATCHES_PER_BLOCK for r, n in zip(ratios, patches)]
    return Estimate(model=model.name, images=len(patches), text_tokens=text_tokens,
                    retain_ratio=sum(kept) / sum(patches),
                    full=_cost(model, patches, text_tokens, bytes_per_value),
                    pruned=_cost(model, kept, text_tokens, bytes_per_value))


# --- `pixelprune estimate` ---------------------------------------------------------------

def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 3840x2160, got {text!r}") from None
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="2b", choices=sorted(MODELS), help="Qwen3-VL size (default 2b)")
    parser.add_argument("--size", type=_size, action="append", required=True, metavar="WxH",
                        help="screenshot/page size in pixels, before smart_resize; repeat for several images")
    parser.add_argument("--images", type=int, default=1, metavar="N",
                        help="each --size counts N times (pages of a multi-page document)")
    parser.add_argument("--retain", type=float, action="append", metavar="RATIO",
                        help="kept-block ratio (0, 1]: once for all images or once per --size (default 1.0)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the prompt (default 0)")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached value (bf16: 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.images <= MAX_IMAGES:
        raise ValueError(f"--images must be in 1..{MAX_IMAGES}, got {args.images}")
    ratios = args.retain or [1.0]
    if len(ratios) not in (1, len(args.size)):
        raise ValueError(f"give --retain once or once per --size ({len(args.size)}), got {len(ratios)}")
    ratios = ratios * len(args.size) if len(ratios) == 1 else ratios
    sizes, per_image = [], []
    for (width, height), ratio in zip(args.size, ratios):
        h, w = smart_resize(height, width)
        sizes += [(w, h)] * args.images
        per_image += [ratio] * args.images
    result = estimate(args.model, sizes, per_image, args.text_tokens, args.kv_bytes)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    full, pruned = result.full, result.pruned
    print(f"{result.model}: {result.images} image(s), {result.text_tokens} text tokens, "
          f"retain {100 * result.retain_ratio:.1f} %")
    print(f"{'':<16}{'full':>12}{'pruned':>12}{'pruned/full':>13}")
    rows = [("visual tokens", full.visual_tokens, pruned.visual_tokens, "{:>12d}"),
            ("ViT TFLOPs", full.vit_tflops, pruned.vit_tflops, "{:>12.2f}"),
            ("merger TFLOPs", full.merger_tflops, pruned.merger_tflops, "{:>12.2f}"),
            ("LLM TFLOPs", full.llm_tflops, pruned.llm_tflops, "{:>12.2f}"),
            ("total TFLOPs", full.total_tflops, pruned.total_tflops, "{:>12.2f}"),
            ("KV cache GB", full.kv_cache_bytes / 1e9, pruned.kv_cache_bytes / 1e9, "{:>12.3f}")]
    for name, a, b, fmt in rows:
        print(f"{name:<16}{fmt.format(a)}{fmt.format(b)}{b / a:>13.3f}")
    print(f"FLOPs speedup {result.flops_speedup:.2f}x, KV cache saving {100 * result.kv_cache_saving:.1f} %")
    return 0
