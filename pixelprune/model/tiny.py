"""A tiny Qwen3-VL checkpoint (dense, or the MoE variant) with deterministic random weights,
for tests and demos.

`write_tiny_checkpoint(dir)` writes everything `AutoModelForImageTextToText` and
`AutoProcessor` need to load offline: config, generation config, safetensors
weights, a Qwen2 byte-level BPE tokenizer with Qwen's special tokens, the
Qwen3-VL chat template, the image-processor config (PIL backend, Qwen3-VL's
released values) and a README saying the weights are random.

The architecture is QWEN3VL.md's tiny config (4+4 layers, hidden 128/64) except
for the vocabulary. Qwen's real vocabulary has 151,643 BPE tokens and puts the
special tokens at 151643..151668; an embedding of that size would be 97 % of the
parameters (two 151936x128 matrices, ~155 MB of float32) and every forward pass
would compute 151,936 logits per position. Here a 512-token byte-level BPE is
trained offline on a fixed built-in text, the 26 special tokens follow it in
Qwen's order (so `<|image_pad|>` is 512 + 12 = 524 instead of 151643 + 12), and
`vocab_size` is 576. Code must therefore read token ids from the config
(`config.image_token_id`, ...), never hard-code 151655.

`arch="qwen3_vl_moe"` writes the same layout as `Qwen3VLMoeForConditionalGeneration` (the
architecture of Qwen3-VL-30B-A3B, UI-Venus-1.5-30B-A3B and Holo2-30B-A3B): every decoder
MLP is a sparse block of 8 experts (128 wide), 2 per token. `answer=TEXT` rigs the text
model to answer TEXT (`pixelprune.model.rig`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Qwen2/Qwen3 special tokens in their released order (151643 + index there).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
BPE_VOCAB_SIZE = 512  # ordinary byte-level BPE tokens: ids 0..511
SPECIAL_BASE = BPE_VOCAB_SIZE  # first special token id (Qwen: 151643)
TOKEN_IDS = {tok: SPECIAL_BASE + i for i, tok in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 576  # embedding rows: 538 tokens padded to a multiple of 64 (Qwen pads 151669 to 151936)

TINY_CONFIG: dict = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": TOKEN_IDS["<|image_pad|>"],
    "video_token_id": TOKEN_IDS["<|video_pad|>"],
    "vision_start_token_id": TOKEN_IDS["<|vision_start|>"],
    "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text", "vocab_size": VOCAB_SIZE, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 5000000.0,
        # mrope_section sums to head_dim / 2
        "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": TOKEN_IDS["<|endoftext|>"], "eos_token_id": TOKEN_IDS["<|im_end|>"],
    },
    "vision_config": {
        "model_type": "qwen3_vl", "depth": 4, "hidden_size": 64, "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 128, "num_heads": 4, "in_channels": 3, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 128,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [1, 2, 3],
    },
}

ARCHS = ("qwen3_vl", "qwen3_vl_moe")  # --arch values: dense Qwen3-VL, and its mixture-of-experts variant
# The MoE variant: TINY_CONFIG with the model types of Qwen3VLMoeConfig and a sparse MLP in every layer.
MOE_TEXT = {"model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 128, "num_experts": 8,
            "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": []}


def tiny_config(arch: str = "qwen3_vl") -> dict:
    """The config.json contents of the tiny checkpoint of this architecture (a fresh copy)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    config = json.loads(json.dumps(TINY_CONFIG))
    if arch == "qwen3_vl_moe":
        config.update(architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe")
        config["text_config"].update(MOE_TEXT)
        config["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    return config


# Qwen3-VL's released preprocessor values (Qwen2VLImageProcessorPil arguments); the class
# defaults are Qwen2-VL's (patch 14, CLIP mean/std), so every value is given.
PREPROCESSOR_CONFIG: dict = {
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "resample": 3,  # bicubic
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}

# Qwen3-VL chat format: one <|vision_start|><|image_pad|><|vision_end|> per image item;
# the processor expands <|image_pad|> to grid_t*grid_h*grid_w/4 tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Fixed text the BPE merges are learnt from (deterministic; no download).
_BPE_TEXT = """\
Click the Save button in the toolbar. Open the File menu and choose Export as PDF.
Where is the search box? Point to the close icon of the settings window.
Output the click position as (x, y) in the range 0 to 1000. The answer is (512, 384).
The terminal shows the result of the last command; scroll down to read the error message.
Select the second tab, type the user name and password, then press the Sign in button.
Screen grounding: given a screenshot and an instruction, find the element to click.
Documents, charts, tables, forms, web pages, mobile apps and desktop applications.
Settings, Preferences, Help, About, Cancel, Apply, OK, Next, Back, Finish, Delete, Edit, View.
0123456789 () [] {} <> , . ; : ! ? - _ + = * / \\ | @ # $ % & ' " ~ ^
"""


def _build_tokenizer():
    """Train a 512-token byte-level BPE on `_BPE_TEXT` and wrap it as a Qwen2Tokenizer with
    the special tokens at SPECIAL_BASE + index (Qwen's order)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_BPE_TEXT] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    if len(vocab) != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training produced {len(vocab)} tokens, expected {BPE_VOCAB_SIZE}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab.update(TOKEN_IDS)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=262144,
                         extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")])
    tok.chat_template = CHAT_TEMPLATE
    for token, want in TOKEN_IDS.items():
        if tok.convert_tokens_to_ids(token) != want:
            raise RuntimeError(f"tokenizer put {token} at {tok.convert_tokens_to_ids(token)}, expected {want}")
    return tok


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, answer: str | None = None,
                          arch: str = "qwen3_vl") -> Path:
    """Write a complete tiny Qwen3-VL checkpoint with weights drawn from `seed` into `out_dir`
    (created if missing) and return its path. The same seed gives bit-identical weights.

    `answer`: rig the text model so that greedy decoding always answers this text, whatever
    the image (e.g. '{"point_2d": [642, 318]}' for end-to-end checks of point mapping and
    clicks; any text of up to 127 tokens, repeated tokens included); the vision tower keeps
    its random weights and still runs. `arch`: "qwen3_vl" (dense) or "qwen3_vl_moe"."""
    import torch
    from transformers import (GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from pixelprune.model.rig import answer_chain, rig_answer

    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if arch == "qwen3_vl_moe"
                                 else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_class(**tiny_config(arch))
    tokenizer = _build_tokenizer()
    if answer is not None:
        answer_chain(tokenizer, answer, config.text_config)  # refuse a bad answer before writing anything
    if not str(out_dir).strip():
        raise ValueError("output directory must not be empty")
    out = Path(out_dir)
    try:  # an existing file, or a file where a parent folder should be
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{out}: cannot create the checkpoint directory ({exc.strerror or exc})") from None
    readme = out / "README.md"
    if readme.is_file() and "RANDOM WEIGHTS" not in readme.read_text(errors="replace"):
        raise ValueError(f"{out} already holds a README.md that is not a tiny checkpoint's; "
                         "choose an empty or new directory")
    config.pixelprune_random_weights = True  # read by the engine: outputs must be labelled meaningless
    with torch.random.fork_rng():  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=TOKEN_IDS["<|endoftext|>"], pad_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]], do_sample=False)
    if answer is not None:
        rig_answer(model, tokenizer, answer)
        model.config.pixelprune_rigged_answer = answer  # read by the server: the rig is exact in float32 only
    model.save_pretrained(out)

    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(**PREPROCESSOR_CONFIG).save_pretrained(out)
    Qwen3VLVideoProcessor().save_pretrained(out)  # Qwen3-VL's defaults; videos need torchvision
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n")
    rigged = "" if answer is None else _RIGGED.format(answer=answer)
    layout = _MOE if arch == "qwen3_vl_moe" else ""
    (out / "README.md").write_text(_README.format(seed=seed) + layout + rigged)
    return out


_README = """\
# Tiny Qwen3-VL checkpoint — RANDOM WEIGHTS

Written by `pixelprune tiny-checkpoint` (pixelprune/tiny.py) with seed {seed}.
The weights are random: the model's outputs are meaningless text. It exists so
that tests and demos run the real Qwen3-VL code (transformers'
Qwen3VLForConditionalGeneration) on CPU in milliseconds.

Architecture: Qwen3-VL layout with a 4-layer, 64-wide ViT (16 px patches, 2x2
merge, DeepStack at layers 1-3) and a 4-layer, 128-wide text model. The
vocabulary is a 512-token byte-level BPE followed by Qwen's special tokens
(`<|image_pad|>` = 524, not 151655); read ids from config.json.
"""

_MOE = """
Mixture of experts: `Qwen3VLMoeForConditionalGeneration` (`qwen3_vl_moe`), every
decoder MLP a sparse block of 8 experts, 2 per token.
"""

_RIGGED = """
## Rigged answer

The text model is rigged to answer `{answer}` to every prompt (pixelprune/model/rig.py:
attention heads that measure the distance to the generation prompt, a last-layer MLP
that maps each answer step to its token), for end-to-end checks of point parsing,
mapping and clicking. Still not a real model. Exact in float32.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--answer", metavar="TEXT", default=None,
                        help='rig the model to always answer TEXT, e.g. \'{"point_2d": [642, 318]}\' or any '
                             "family's answer form (up to 127 tokens) for end-to-end checks of mapping and clicks")
    parser.add_argument("--arch", choices=ARCHS, default="qwen3_vl",
                        help="qwen3_vl (dense, default) or qwen3_vl_moe (mixture of experts, like Qwen3-VL-30B-A3B)")


def run(args: argparse.Namespace) -> int:
    out = write_tiny_checkpoint(args.dir, seed=args.seed, answer=args.answer, arch=args.arch)
    rigged = "" if args.answer is None else f", rigged to answer {args.answer!r}"
    print(f"wrote tiny random-weight {args.arch} checkpoint to {out}{rigged}")
    return 0
