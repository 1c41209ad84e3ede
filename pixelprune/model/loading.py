"""Loading a checkpoint: which device, dtype and attention implementations, and whether its weights are
random (a test checkpoint, whose outputs must say so). Used by `GroundingEngine.load` and `pixelprune
distill`."""

from __future__ import annotations

from pathlib import Path

import torch

RANDOM_WEIGHTS_MARKER = "RANDOM WEIGHTS"  # README.md heading written by `pixelprune tiny-checkpoint`
TEXT_LOADED = ("sdpa", "eager")  # text attentions a checkpoint is loaded with (the engine routes sdpa per row)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU; else one of float32, bfloat16, float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_attn_implementation(requested: str | None, device: torch.device) -> str:
    """None -> flash_attention_2 on CUDA when flash_attn is importable, else sdpa. (The vision
    encoder's; the text model takes sdpa unless eager is asked for, see `attention_config`.)"""
    if requested is not None:
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def checkpoint_has_random_weights(model_id: str, config) -> bool:
    """True for checkpoints written by `pixelprune tiny-checkpoint`: a local directory whose
    README.md carries the RANDOM WEIGHTS heading, or a config flag `pixelprune_random_weights`."""
    if bool(getattr(config, "pixelprune_random_weights", False)):
        return True
    readme = Path(model_id) / "README.md"
    return readme.is_file() and RANDOM_WEIGHTS_MARKER in readme.read_text(errors="replace")


def attention_config(vision_attn: str) -> str | dict:
    """`attn_implementation` for from_pretrained: one name when text and vision agree, else per sub-config
    (the engine's text model needs one of TEXT_LOADED: its prefill attention goes per row through SDPA)."""
    text_attn = vision_attn if vision_attn in TEXT_LOADED else "sdpa"
    return vision_attn if text_attn == vision_attn else {"text_config": text_attn, "vision_config": vision_attn}
