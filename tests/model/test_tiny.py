"""The tiny random-weight Qwen3-VL checkpoint: files, ids, determinism, offline loading, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torchvision_available

from pixelprune.cli import main
from pixelprune.model.processor import load_processor
from pixelprune.model.tiny import SPECIAL_TOKENS, TINY_CONFIG, write_tiny_checkpoint

FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
         "processor_config.json", "README.md"}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)


def test_checkpoint_files_and_token_ids(tiny_checkpoint, processor):
    assert FILES <= {p.name for p in tiny_checkpoint.iterdir()}
    assert "RANDOM WEIGHTS" in (tiny_checkpoint / "README.md").read_text()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    tok = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert config[key] == tok.convert_tokens_to_ids(token) == TINY_CONFIG[key]
    # Qwen's order: <|endoftext|> first, then consecutive ids; all inside the embedding
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert len(tok) <= config["text_config"]["vocab_size"]
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (16, 2, 2)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}


def test_tokenizer_round_trips_text(processor):
    tok = processor.tokenizer
    text = "Click (512, 384) — the Save button! Größe: 42 px\n\tdone"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merged something
    special = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    ids = tok.encode(special, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[:1] + ids[-4:]) == [
        "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>"]


def test_chat_template_and_processor_outputs(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find Save."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find Save.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    messages[0]["content"][0]["image"] = image
    out = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(out)
    # 300x200 -> smart_resize (multiples of 32, at least 65536 px) -> 320x224 -> 20x14 patches of 16 px
    assert out["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert out["pixel_values"].shape == (14 * 20, 3 * 2 * 16 * 16)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_id).sum()) == 14 * 20 // 4
    assert torch.equal(out["mm_token_type_ids"] == 1, out["input_ids"] == image_id)


def test_same_seed_same_checkpoint(tiny_checkpoint, tmp_path):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (tiny_checkpoint, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (tiny_checkpoint / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="seed"):
        write_tiny_checkpoint(tmp_path / "bad", seed=-1)


def test_model_loads_and_runs(tiny_checkpoint, processor):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert model.config.text_config.vocab_size == TINY_CONFIG["text_config"]["vocab_size"]
    messages = [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (256, 256), (200, 30, 30))}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not is_torchvision_available(), reason="transformers 5.23's AutoProcessor builds "
                    "Qwen3VLProcessor's video processor, which needs torchvision (not installable on CPU torch here)")
def test_auto_processor_loads(tiny_checkpoint):
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(tiny_checkpoint)).__name__ == "Qwen3VLProcessor"


OFFLINE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from pixelprune.model.processor import load_processor
    path = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = load_processor(path)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (320, 256), "white")},
                                          {"type": "text", "text": "Where is Save?"}]}]
    inp = proc.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    print(sorted(inp), tuple(out.shape), out.shape[1] - inp["input_ids"].shape[1])
""")


def test_cli_writes_a_dir_that_loads_offline(tmp_path):
    target = tmp_path / "tiny"
    assert main(["tiny-checkpoint", str(target), "--seed", "3"]) == 0
    assert FILES <= {p.name for p in target.iterdir()}
    assert main(["tiny-checkpoint", str(tmp_path / "neg"), "--seed", "-2"]) == 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(target)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("['attention_mask', 'image_grid_thw', 'input_ids', 'mm_token_type_ids', 'pixel_values']")
    assert last.endswith(" 3")  # three new tokens


def test_cli_bad_output_paths_and_seeds_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" must not write into the working directory
    a_file = tmp_path / "a.png"
    a_file.write_bytes(b"x")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    for argv in ([str(a_file)], [str(a_file / "sub")], [""], [str(project)],
                 [str(tmp_path / "big"), "--seed", str(2**70)]):
        assert main(["tiny-checkpoint", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("pixelprune tiny-checkpoint: error:") and "\n" not in err, err
    assert not (tmp_path / "big").exists() and not (tmp_path / "config.json").exists()
    assert (project / "README.md").read_text() == "# my project\n"


def test_rigged_answer_reaches_the_point_parser(tmp_path, corpus_dir):
    from pixelprune.model.engine import GroundingEngine, ModelSpec, PruneSettings

    out = write_tiny_checkpoint(tmp_path / "rigged", seed=0, answer='{"point_2d": [642, 318]}')
    assert '{"point_2d": [642, 318]}' in (out / "README.md").read_text()
    engine = GroundingEngine.load(ModelSpec(model=str(out), max_new_tokens=24))
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        shot = np.asarray(img.convert("RGB"))[:300, :500].copy()
    result = engine.ground(engine.prepare(shot, PruneSettings()), "anything")
    assert result.raw_text == '{"point_2d": [642, 318]}'
    assert result.point == (0.642 * 500, 0.318 * 300)
    assert engine.is_random_weights


def test_cli_writes_the_moe_architecture(tmp_path, capsys):
    assert main(["tiny-checkpoint", str(tmp_path / "moe"), "--arch", "qwen3_vl_moe", "--answer", "[5, 5]"]) == 0
    assert "qwen3_vl_moe" in capsys.readouterr().out
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"] and config["model_type"] == "qwen3_vl_moe"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "moe")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (8, 2, 128)
    assert "Mixture of experts" in (tmp_path / "moe" / "README.md").read_text()
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line usage error
        main(["tiny-checkpoint", str(tmp_path / "x"), "--arch", "llama"])
    assert exited.value.code == 2 and "invalid choice: 'llama'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown architecture 'llama'; expected one of qwen3_vl, qwen3_vl_moe"):
        write_tiny_checkpoint(tmp_path / "x", arch="llama")
    assert not (tmp_path / "x").exists()
