"""FLOPs/KV estimator: hand-computed tiny configs, per-image ViT attention,
Table 4 of the paper, and the `pixelprune estimate` CLI."""

from __future__ import annotations

import json

import pytest

from pixelprune import flops
from pixelprune.cli import main
from pixelprune.flops import (
    QWEN3_VL_2B, ModelConfig, TextConfig, VisionConfig, estimate, kv_cache_bytes, llm_flops, merger_flops,
    vit_flops,
)

# A tiny config small enough to do by hand.
TINY = ModelConfig(
    "tiny",
    VisionConfig(depth=1, hidden_size=2, intermediate_size=4, out_hidden_size=3, deepstack_layers=1),
    TextConfig(num_layers=1, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=2))


def test_tiny_config_by_hand():
    # ViT, N=8 patches, d=2, f=4: 2*8*(4*2*2 + 2*2*4) + 4*8*8*2 = 512 + 512
    assert vit_flops(TINY.vision, 8) == 1024
    # Merger: D_m = 4*2 = 8, 8/4 = 2 tokens, K = 1 + 1: 2 * 2 * 2*(8*8 + 8*3) = 704
    assert merger_flops(TINY.vision, 8) == 704
    # LLM, S=5, d=4, n_q*d_h=4, n_kv*d_h=2, f=8: C_tok = 2*(2*4*4 + 2*4*2 + 3*4*8) = 288;
    # 5*288 + 4*25*4 = 1440 + 400
    assert llm_flops(TINY.text, 5) == 1840
    # KV: 2 (K and V) * 1 layer * 1 head * 2 dims * 5 tokens * 2 bytes
    assert kv_cache_bytes(TINY.text, 5) == 40
    assert kv_cache_bytes(TINY.text, 5, bytes_per_value=4) == 80


def test_estimate_tiny_full_and_pruned():
    # 64x32 px = 4x2 patches = 8 patches = 2 blocks; 3 text tokens -> S = 5
    result = estimate(TINY, [(64, 32)], retain=0.5, text_tokens=3)
    assert result.full.patches == 8 and result.full.visual_tokens == 2 and result.full.sequence_length == 5
    assert result.full.vit_tflops * 1e12 == pytest.approx(1024)
    assert result.full.merger_tflops * 1e12 == pytest.approx(704)
    assert result.full.llm_tflops * 1e12 == pytest.approx(1840)
    assert result.full.total_tflops * 1e12 == pytest.approx(1024 + 704 + 1840)
    # pruned: 1 block = 4 patches, S = 4
    # ViT: 2*4*32 + 4*16*2 = 256 + 128; merger: 2*1*2*88 = 352; LLM: 4*288 + 4*16*4 = 1408
    assert result.pruned.patches == 4 and result.pruned.sequence_length == 4
    assert result.pruned.vit_tflops * 1e12 == pytest.approx(384)
    assert result.pruned.merger_tflops * 1e12 == pytest.approx(352)
    assert result.pruned.llm_tflops * 1e12 == pytest.approx(1408)
    assert result.pruned.kv_cache_bytes == 32
    assert result.retain_ratio == 0.5
    assert result.flops_speedup == pytest.approx(3568 / 2144)
    assert result.kv_cache_saving == pytest.approx(1 - 32 / 40)


def test_multi_page_vit_attention_is_per_page_llm_is_one_sequence():
    one = estimate(TINY, [(64, 32)], text_tokens=3)
    two = estimate(TINY, [(64, 32), (64, 32)], text_tokens=3)
    # ViT and merger: exactly twice one page (N^2 per page, not (2N)^2)
    assert two.full.vit_tflops == pytest.approx(2 * one.full.vit_tflops)
    assert two.full.merger_tflops == pytest.approx(2 * one.full.merger_tflops)
    # LLM: one sequence of 2 + 2 + 3 tokens: 7*288 + 4*49*4
    assert two.full.sequence_length == 7
    assert two.full.llm_tflops * 1e12 == pytest.approx(7 * 288 + 4 * 49 * 4)
    # patch counts are accepted too; 16 patches of one image != two images of 8
    merged = estimate(TINY, [16], text_tokens=3)
    assert merged.full.vit_tflops > two.full.vit_tflops


def test_retain_per_image_and_anchor_minimum():
    result = estimate(QWEN3_VL_2B, [(3840, 2176), (1920, 1088)], retain=[0.25, 0.5])
    assert result.full.visual_tokens == 8160 + 2040
    assert result.pruned.visual_tokens == 2040 + 1020
    tiny = estimate(QWEN3_VL_2B, [(64, 64)], retain=0.01)
    assert tiny.pruned.visual_tokens == 1  # the anchor block is always kept


def test_kv_cache_bytes_2b_and_8b():
    # 2B: 2 * 28 layers * 8 kv heads * 128 dims * 2 bytes = 114688 bytes per token
    result = estimate("2b", [(3840, 2176)], retain=1.0, text_tokens=50)
    assert result.full.kv_cache_bytes == 114688 * (8160 + 50)
    # 8B: 2 * 36 * 8 * 128 * 2 = 147456 bytes per token
    assert estimate("8b", [(1920, 1088)]).full.kv_cache_bytes == 147456 * 2040


# Table 4 (Qwen3-VL-2B, prefill TFLOPs), with the inputs documented in pixelprune/flops.py:
# ScreenSpot-Pro Scientific: one 2880x1800 screenshot (-> 2880x1792), 100 text tokens, 26.2 % kept.
# MMLongBench-Doc: 43 US-letter pages at 150 dpi (1275x1650 -> 1280x1664), 100 text tokens, 50.3 % kept.
@pytest.mark.parametrize("sizes, retain, paper_full, paper_pruned", [
    ([(2880, 1792)], 0.262, 70, 11),
    ([(1280, 1664)] * 43, 0.503, 2694, 762),
])
def test_reproduces_table_4_within_10_percent(sizes, retain, paper_full, paper_pruned):
    result = estimate("2b", sizes, retain=retain, text_tokens=100)
    assert result.full.total_tflops == pytest.approx(paper_full, rel=0.10)
    assert result.pruned.total_tflops == pytest.approx(paper_pruned, rel=0.10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown model"):
        estimate("70b", [(64, 64)])
    with pytest.raises(ValueError, match="multiples of 32"):
        estimate("2b", [(100, 64)])
    with pytest.raises(ValueError, match="patch count"):
        estimate("2b", [6])
    with pytest.raises(ValueError, match="retain"):
        estimate("2b", [(64, 64)], retain=0)
    with pytest.raises(ValueError, match="2 images"):
        estimate("2b", [(64, 64), (64, 64)], retain=[0.5])
    with pytest.raises(ValueError, match="at least one image"):
        estimate("2b", [])


def test_cli_json(capsys):
    assert main(["estimate", "--model", "2b", "--size", "3840x2160", "--retain", "0.262",
                 "--text-tokens", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert data["full"]["visual_tokens"] == 8160  # 3840x2160 -> smart_resize -> 3840x2176
    assert data["pruned"]["visual_tokens"] == round(0.262 * 8160)
    assert data["full"]["kv_cache_bytes"] == 114688 * 8210
    assert data["flops_speedup"] == pytest.approx(data["full"]["total_tflops"] / data["pruned"]["total_tflops"])
    expected = estimate("2b", [(3840, 2176)], 0.262, 50)
    assert data["full"]["total_tflops"] == pytest.approx(expected.full.total_tflops)


def test_cli_pages_and_table(capsys):
    assert main(["estimate", "--size", "1275x1650", "--images", "43", "--retain", "0.503",
                 "--text-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "43 image(s)" in out and "total TFLOPs" in out and "KV cache GB" in out
    result = estimate("2b", [(1280, 1664)] * 43, 0.503, 100)
    assert f"{result.full.total_tflops:.2f}" in out and f"{result.pruned.total_tflops:.2f}" in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "640x480", "--retain", "1.5"], "retain ratios must be in (0, 1]"),
    (["--size", "640x480", "--images", "0"], "--images must be in 1..100000"),
    (["--size", "640x480", "--images", "1000000000"], "--images must be in 1..100000"),
    (["--size", "640x480", "--size", "64x64", "--retain", "0.5", "--retain", "0.5", "--retain", "0.5"],
     "give --retain once or once per --size"),
    (["--size", "40000x100"], "aspect ratio"),
])
def test_cli_errors(capsys, argv, message):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelprune estimate: error:") and message in err and "\n" not in err


def test_model_table_names():
    assert set(flops.MODELS) == {"2b", "4b", "8b"}
    assert {m.name for m in flops.MODELS.values()} == {
        "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"}
