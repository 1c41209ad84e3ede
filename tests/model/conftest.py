"""Fixtures of the model-floor tests: the tiny checkpoint's model (fp32, eval) and processor, one per module
(tests that change the model, e.g. its attention implementation, get their own copy)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from pixelprune.model.processor import load_processor


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)
