"""`--compile`: the MLPs of the ViT and the LLM compiled with dynamic shapes give the eager model's answers
(tiny checkpoint, fp32, CPU; torch.compile's "eager" backend traces with dynamo like inductor does, without
its C++ build), and a second image size reuses the graphs instead of compiling again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.model.compiled import compile_feed_forward, feed_forward_modules
from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings


@pytest.fixture(scope="module")
def crops(corpus_dir) -> list[np.ndarray]:
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    return [web[100:360, 200:552].copy(), web[300:620, 40:296].copy()]


def test_compiled_feed_forward_answers_like_eager(tiny_checkpoint, crops):
    spec = ModelSpec(model=str(tiny_checkpoint), max_new_tokens=6)
    eager = GroundingEngine.load(spec, batch=BatchSettings(max_batch_tokens=4096))
    compiled = GroundingEngine.load(spec, batch=BatchSettings(max_batch_tokens=4096, compile=True,
                                                              compile_backend="eager"))
    modules = feed_forward_modules(compiled.model)
    assert len(modules) == 4 + 4 and all(m._compiled_call_impl is not None for m in modules)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in feed_forward_modules(eager.model))
    assert compile_feed_forward(compiled.model, "eager") == 0  # already compiled: left as it is
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    for i, crop in enumerate(crops):
        requests = [GroundRequest(e.prepare(crop, PruneSettings()), "Open the menu") for e in (eager, compiled)]
        want, got = eager.ground(requests[0].prepared, "Open the menu"), compiled.ground(requests[1].prepared,
                                                                                          "Open the menu")
        assert got.raw_text == want.raw_text and got.generated_tokens == want.generated_tokens
        assert got.answer_logprob == pytest.approx(want.answer_logprob, abs=1e-4)
        if i == 0:
            graphs = counters["unique_graphs"]
    assert 0 < graphs == counters["unique_graphs"]  # the second size (and batch) compiled nothing new
