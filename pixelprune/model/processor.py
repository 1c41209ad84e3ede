"""The Qwen3-VL processor, also where torchvision is missing, and its exact inverse for
selection on processor rows (`rows_to_uint8_images`)."""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


def load_processor(name_or_path: str, **kwargs):
    """`AutoProcessor.from_pretrained(name_or_path)`, or, where torchvision is missing (transformers
    5.23's AutoProcessor then cannot build Qwen3VLProcessor's video processor), the same
    Qwen3VLProcessor assembled from its tokenizer, PIL image processor and chat template, with a
    video processor that works for images only."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return _ImageOnlyQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **kwargs), tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(), chat_template=tokenizer.chat_template)


class _ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor (5.23 `processing_qwen3_vl.py`) built without torchvision. Only change:
    the video processor's class check is skipped, because without torchvision transformers
    exposes `BaseVideoProcessor` as a dummy. Images and text work as in the stock class;
    videos fail inside the video processor (they need torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def rows_to_uint8_images(pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Invert the Qwen3-VL processor exactly: rows (sum t*h*w, 3*2*16*16) normalised with mean = std
    = 0.5 -> uint8 (h*16, w*16, 3) per image (first temporal copy). ValueError if the rows are not
    such values (another normalisation, or only the kept rows)."""
    n_full = sum(t * h * w for t, h, w in grids)
    if pixel_values.ndim != 2 or pixel_values.shape[0] != n_full or pixel_values.shape[1] % 6 != 0:
        raise ValueError(f"selection needs all {n_full} processor rows, got shape {tuple(pixel_values.shape)}")
    x = pixel_values.detach().to("cpu", torch.float32).numpy()
    u = np.rint((x * 0.5 + 0.5) * 255.0)
    if np.abs(x - (u / 255.0 - 0.5) / 0.5).max(initial=0.0) > 2e-3 or u.min(initial=0) < 0 or u.max(initial=0) > 255:
        raise ValueError("pixel_values are not processor rows normalised with mean = std = 0.5")
    patch = int(round((x.shape[1] // 6) ** 0.5))
    images, start = [], 0
    for t, h, w in grids:
        if t != 1:
            raise ValueError(f"only images (grid t == 1) are supported, got t={t}")
        blk = u[start:start + h * w].reshape(h // 2, w // 2, 2, 2, 3, 2, patch, patch)[:, :, :, :, :, 0]
        # (bi, bj, r, c, C, y, x) -> (bi, r, y, bj, c, x, C)
        images.append(np.ascontiguousarray(blk.transpose(0, 2, 5, 1, 3, 6, 4)).reshape(h * patch, w * patch, 3)
                      .astype(np.uint8))
        start += h * w
    return images
