"""What `python -m benchmarks.gpu` runs on: a RANDOM-WEIGHT checkpoint of a chosen size, written
to a directory without any download, and the issue's screenshot sizes made from the test corpus.

Checkpoint: `write_tiny_checkpoint` writes the tokenizer, chat template, processor configs
and generation config (and, for size "tiny", the model itself); for "mid" and "2b" the model
is then replaced by one built from MODEL_SIZES with random weights (seed 0), saved in the
run's dtype, README.md saying RANDOM WEIGHTS and `pixelprune_random_weights` set in
config.json, so GroundingEngine.load flags every output as meaningless.

Screenshots (SCREENSHOTS): a corpus image used as it is when it has the size; an integer
nearest-neighbour upscale when the size is a multiple (a 1920x1080 page at device scale 2 is
what a browser renders on a 3840x2160 screen: every CSS pixel becomes 2x2 pixels); edge
padding on the right and bottom for the last few pixels. `scaled` shrinks them for the CPU
run with PIL's bicubic filter.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixelprune.model.tiny import TINY_CONFIG, write_tiny_checkpoint

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
SEED = 0  # weight seed of every random checkpoint written here
RANDOM_WEIGHTS = "RANDOM WEIGHTS"  # the marker GroundingEngine looks for in README.md

# Qwen3-VL-2B-Instruct's config.json (huggingface.co/Qwen/Qwen3-VL-2B-Instruct; not downloaded
# here). Every value below is the same in several public copies of that file (configuration
# tests of third-party Qwen3-VL ports found with the code search; one lists a full 2B config)
# and, for the layer sizes, in the paper's Appendix E and pixelprune.flops.QWEN3_VL_2B. The
# hub's file list gives model.safetensors as 4.26 GB, i.e. ~2.13 B bf16 parameters with the
# embedding tied to lm_head, which is what this config builds. The token ids are NOT the 2B's:
# the tokenizer is the tiny checkpoint's (ids 0..537, `<|image_pad|>` = 524), which the 2B
# vocabulary of 151,936 rows covers.
QWEN3_VL_2B_TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    "attention_bias": False, "tie_word_embeddings": True,
}
QWEN3_VL_2B_VISION = {
    "depth": 24, "hidden_size": 1024, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4096,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "out_hidden_size": 2048, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
}
# benchmarks/prefill.py's mid-size model (tiny vocabulary): minutes on a CPU instead of hours.
MID_TEXT = {"num_hidden_layers": 8, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 128,
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}}
MID_VISION = {"depth": 4, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4,
              "deepstack_visual_indexes": [1, 2, 3], "out_hidden_size": 1024}
MODEL_SIZES = {  # size -> (text_config, vision_config, tie_word_embeddings) over TINY_CONFIG
    "tiny": None,
    "mid": (MID_TEXT, MID_VISION, False),
    "2b": (QWEN3_VL_2B_TEXT, QWEN3_VL_2B_VISION, True),
}
MODEL_LABELS = {
    "tiny": "the tiny checkpoint (pixelprune.model.tiny: 4+4 layers, hidden 128/64)",
    "mid": "a mid-size Qwen3-VL (benchmarks/prefill.py's sizes: ViT 4x256, text 8x1024)",
    "2b": "Qwen3-VL-2B-Instruct's config (ViT 24x1024, DeepStack 5/11/17; text 28x2048, 16/8 heads)",
}


def model_config(size: str) -> dict:
    """The Qwen3VLConfig arguments of `size`: TINY_CONFIG's token ids and layout, the size's layers."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    config = json.loads(json.dumps(TINY_CONFIG))  # deep copy: the config class edits nested dicts
    if MODEL_SIZES[size] is None:
        return config
    text, vision, tied = MODEL_SIZES[size]
    config["text_config"].update(json.loads(json.dumps(text)))
    config["vision_config"].update(json.loads(json.dumps(vision)))
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = tied
    return config


_README = """\
# Qwen3-VL checkpoint for benchmarks — {marker}

Written by `python -m benchmarks.gpu` with seed {seed}, random initialisation,
saved as {dtype}:
{label}.

The outputs are meaningless text; the times and sizes are those of real Qwen3-VL
code at this size. Tokenizer, chat template and processor are the tiny
checkpoint's (pixelprune.model.tiny); read token ids from config.json.
"""


def write_checkpoint(out_dir: Path, size: str, device: str = "cpu", dtype: str = "float32") -> Path:
    """Write a complete random-weight checkpoint of `size` into `out_dir` (see the module docstring).

    The model is initialised on `device` (fast on a GPU) and saved as `dtype`."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out = write_tiny_checkpoint(out_dir, seed=SEED)
    if MODEL_SIZES.get(size, ()) is None:
        return out
    config = Qwen3VLConfig(**model_config(size))
    config.pixelprune_random_weights = True
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)
    torch.manual_seed(SEED)  # CPU and CUDA generators
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config).eval()
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig.from_pretrained(out)
    model.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (out / "README.md").write_text(_README.format(marker=RANDOM_WEIGHTS, seed=SEED, label=MODEL_LABELS[size],
                                                  dtype=dtype))
    return out


@dataclass(frozen=True)
class Screenshot:
    label: str  # the name for it, e.g. "1920x1080 desktop"
    size: tuple[int, int]  # (W, H) pixels at scale 1
    source: str  # corpus file it is made from


SCREENSHOTS = (
    Screenshot("3840x2160 web page", (3840, 2160), "web_python_tutorial_classes_1920x1080.png"),
    Screenshot("2560x1440 web page", (2560, 1440), "web_sphinx_quickstart_2560x1440.png"),
    Screenshot("1920x1080 desktop", (1920, 1080), "desktop_pcmanfm_xterm_mousepad_1920x1080.png"),
    Screenshot("1280x1664 document page", (1280, 1664), "document_libtasn1_p11.png"),
    Screenshot("1170x2532 phone screen", (1170, 2532), "mobile_flask_quickstart_1170x2532.png"),
)
DESKTOP_1080P = SCREENSHOTS[2]
WEB_1080P = Screenshot("1920x1080 web page", (1920, 1080), "web_python_tutorial_classes_1920x1080.png")


def fit(pixels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(pixels brought to `size` = (W, H), how): integer nearest upscale, then edge pad / crop."""
    width, height = size
    h, w = pixels.shape[:2]
    steps = []
    factor = min(width // w, height // h)
    if factor >= 2:
        pixels = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
        steps.append(f"nearest {factor}x upscale")
        h, w = pixels.shape[:2]
    pixels = pixels[:height, :width]
    pad_h, pad_w = height - pixels.shape[0], width - pixels.shape[1]
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        steps.append(f"edge-padded by {pad_w} px right, {pad_h} px bottom")
    if h > height or w > width:
        steps.append(f"cropped from {w}x{h}")
    return np.ascontiguousarray(pixels), ", ".join(steps) or "as is"


def scaled(pixels: np.ndarray, scale: float) -> np.ndarray:
    """`pixels` resized by `scale` (PIL bicubic); unchanged at 1."""
    if scale == 1:
        return pixels
    h, w = pixels.shape[:2]
    size = (max(32, round(w * scale)), max(32, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))


def load_screenshot(shot: Screenshot, scale: float = 1.0) -> tuple[np.ndarray, str]:
    """(uint8 (H, W, 3) pixels, how they were made) for one screenshot."""
    with Image.open(CORPUS / shot.source) as image:
        pixels = np.asarray(image.convert("RGB"))
    source = f"{shot.source} ({pixels.shape[1]}x{pixels.shape[0]})"
    pixels, how = fit(pixels, shot.size)
    if scale != 1:
        pixels = scaled(pixels, scale)
        how += f", then bicubic x{scale:g} to {pixels.shape[1]}x{pixels.shape[0]}"
    return pixels, f"{source}: {how}"


def distinct(pixels: np.ndarray, k: int) -> np.ndarray:
    """A copy of `pixels` that differs from every other k's: the first 24 pixels of the top row
    spell k in binary (black / white). Only the top-left block changes."""
    if not 0 <= k < 1 << 24:
        raise ValueError(f"frame number must be in [0, 2**24), got {k}")
    frame = pixels.copy()
    bits = ((k >> np.arange(24)) & 1).astype(bool)
    frame[0, :24] = np.where(bits, 255, 0)[:, None].astype(np.uint8)
    return frame


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes (zlib level 1: fast to make; the server decodes it like any PNG)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
