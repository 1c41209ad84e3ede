"""Rig a tiny Qwen3-VL text model (dense or MoE) to answer one fixed text to every prompt.

`pixelprune tiny-checkpoint --answer TEXT` uses this so that every model family's answer
form (JSON, tool calls, reasoning then a point, repeated digits) can be served end to end
and its point checked against the exact pixel it must map to. The answer depends only on
how many tokens have been generated, so any text works, repeated tokens included:

* Hidden axes: 0 = a constant every token carries, 1 = `<|im_start|>` (the marker; all other
  tokens embed identically), then one position axis per attention head, then one axis per
  distinct token of the answer. The vision mergers write nothing on axes 0 and 1, so image
  tokens are invisible to the rig (the ViT still runs on its random weights).
* Attention, every layer: each head's query sees keys of all tokens on twelve rotary planes
  whose cosines peak at distance 0 (a token attends to itself; any other token scores
  >= 0.18 x SELF_SCORE lower, up to 262,144 positions), and the marker on one slow plane
  at a score falling SLOPE nats per token with a per-head offset. The head's output
  (marker weight vs self weight) is sigmoid(SLOPE * (centre - distance)): head k resolves
  answer steps 8k..8k+7; markers of earlier turns, 16+ positions further, are e^-12 weaker.
  Markers attend only to markers, so their values, and every feature, are fixed numbers.
* The last layer's MLP (or its two selected experts) is a staircase: a pair of SiLU units per
  step n turns on once the step's head feature passes the midpoint between steps n-1 and n
  (thresholds measured by running the rigged layers once); the down projection writes each
  step's next token minus the previous one, so at step n only token n's axis is positive.
  lm_head reads the token axes. The checkpoint stays a real Qwen3-VL: same classes, same
  shapes, only weights chosen.

The rig computes in float32 (its scores are ~10^5 with 0.75-nat steps); bfloat16 would round
them away. At most RIG_MAX_TOKENS answer tokens (8 per attention head, and one SiLU pair
per token in the last MLP).
"""

from __future__ import annotations

import math

import torch

SLOPE = 0.75  # nats per token of a position head's log-odds
STEPS_PER_HEAD = 8  # answer steps one position head resolves
SELF_SCORE = 200.0  # attention score of a token with itself (softmax units)
# Weights of rotary planes 0..11 in the self-peaked score (their cosine sum stays <= 0.814 for every
# distance 1..262144 at rope_theta 5e6, head_dim 32: a linear program's optimum, checked in tests).
SELF_PLANES = (0.3897, 0.0886, 0.056, 0.0599, 0.0608, 0.0578, 0.0544, 0.0482, 0.0437, 0.0485, 0.0408, 0.0516)
MARKER_PLANE = 12  # rotary plane of the marker's score (9.5e-6 rad per token: monotone over 166,000 positions)
MARKER_TOKEN = "<|im_start|>"
HEADER = "<|im_start|>assistant\n"  # the generation prompt: the marker starts it
REFUSED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>")  # control tokens an answer may not contain
BIAS, MARKER = 0, 1  # hidden axes
LOGIT = 100.0  # lm_head weight of a token axis


def rig_answer(model, tokenizer, answer: str) -> None:
    """Set the text model's weights (in place) so that greedy decoding after the generation prompt
    answers `answer`, then <|im_end|>. ValueError for an answer the rig cannot hold."""
    text = model.model.language_model
    cfg = text.config
    chain = answer_chain(tokenizer, answer, cfg)
    heads = cfg.num_hidden_layers * cfg.num_attention_heads
    tokens = sorted(set(chain))
    axes = {token: 2 + heads + i for i, token in enumerate(tokens)}
    start = len(tokenizer(HEADER)["input_ids"]) - 1  # distance from the last prompt token to the marker
    with torch.no_grad():
        for merger in [model.model.visual.merger, *model.model.visual.deepstack_merger_list]:
            merger.linear_fc2.weight[[BIAS, MARKER]] = 0.0
            merger.linear_fc2.bias[[BIAS, MARKER]] = 0.0
        embed = text.embed_tokens.weight
        embed.zero_()
        embed[:, BIAS] = 1.0
        marker = tokenizer.convert_tokens_to_ids(MARKER_TOKEN)
        embed[marker, BIAS], embed[marker, MARKER] = 0.0, 1.0
        text.norm.weight.fill_(1.0)
        for index, layer in enumerate(text.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            _position_heads(layer.self_attn, index, cfg, start, inv_freq=text.rotary_emb.inv_freq.float())
            _silence_mlp(layer.mlp)
        features, bias = _calibrate(text, tokenizer, len(chain), heads)
        _staircase(text.layers[-1].mlp, chain, axes, features, bias)
        model.lm_head.weight.zero_()
        for token, axis in axes.items():
            model.lm_head.weight[token, axis] = LOGIT


def max_answer_tokens(config) -> int:
    """Answer tokens (without the closing <|im_end|>) a model of this text config can be rigged to."""
    heads = config.num_hidden_layers * config.num_attention_heads
    return min(STEPS_PER_HEAD * heads, _mlp_width(config) // 2) - 1


def _mlp_width(config) -> int:
    if getattr(config, "num_experts", 0):
        return 2 * config.moe_intermediate_size  # the two experts every rigged token is routed to
    return config.intermediate_size


def answer_chain(tokenizer, answer: str, cfg) -> list[int]:
    """The answer's tokens and <|im_end|> for a text config `cfg`; ValueError (one line) for what the
    rig cannot produce: an empty text, control tokens, too many tokens or distinct tokens."""
    if not isinstance(answer, str) or not answer:
        raise ValueError("the rigged answer must be a non-empty text")
    refused = [t for t in REFUSED if t in answer]
    if refused:
        raise ValueError(f"the rigged answer may not contain control tokens, found {', '.join(refused)}")
    chain = tokenizer(answer)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    limit = max_answer_tokens(cfg)
    if len(chain) - 1 > limit:
        raise ValueError(f"answer {answer!r} is {len(chain) - 1} tokens; this checkpoint can be rigged to at most "
                         f"{limit}")
    spare = cfg.hidden_size - 2 - cfg.num_hidden_layers * cfg.num_attention_heads
    if len(set(chain)) > spare:
        raise ValueError(f"answer {answer!r} uses {len(set(chain)) - 1} distinct tokens; at most {spare - 1} fit")
    if cfg.head_dim // 2 <= MARKER_PLANE:
        raise ValueError(f"the rig needs a head_dim of at least {2 * MARKER_PLANE + 2} (rotary planes 0..12)")
    return chain


def _position_heads(attn, layer: int, cfg, start: int, inv_freq: torch.Tensor) -> None:
    """Every head of this layer: the self-peaked score, the marker score with head k's offset, the
    marker flag as value, written to head k's position axis (scaled so a marker's own is 1)."""
    dim, heads = cfg.head_dim, cfg.num_attention_heads
    half, planes = dim // 2, len(SELF_PLANES)
    theta = float(inv_freq[MARKER_PLANE])
    last = cfg.num_hidden_layers * heads - 1

    def offset(k: int) -> float:
        """Head k's marker score at distance 0: its log-odds cross 0 midway through its 8 steps."""
        return SELF_SCORE + SLOPE * (STEPS_PER_HEAD * k + 3.5 + start)

    amplitude = math.hypot(SLOPE / theta, offset(last))
    self_weights = torch.tensor(SELF_PLANES, dtype=torch.float64)
    key = torch.zeros(dim, dtype=torch.float64)
    key[:planes] = (dim * self_weights).sqrt()  # rms 1: k_norm leaves it as it is
    for weight in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
        weight.zero_()
    for head in range(heads):
        k = layer * heads + head
        query = torch.zeros(dim, dtype=torch.float64)
        query[:planes] = SELF_SCORE * self_weights.sqrt()
        phase = math.acos(offset(k) / amplitude)
        query[MARKER_PLANE], query[MARKER_PLANE + half] = amplitude * math.cos(phase), amplitude * math.sin(phase)
        rows = slice(head * dim, (head + 1) * dim)
        attn.q_proj.weight[rows, BIAS] = query.to(attn.q_proj.weight.dtype)
        attn.q_proj.weight[head * dim + MARKER_PLANE, MARKER] = 1.0  # a marker attends to the markers only
        attn.o_proj.weight[2 + k, head * dim] = math.sqrt((1 + heads * layer) / cfg.hidden_size)
    attn.q_norm.weight.fill_(math.hypot(SELF_SCORE, amplitude) / math.sqrt(dim))
    attn.k_norm.weight.fill_(1.0)
    for kv in range(cfg.num_key_value_heads):
        attn.k_proj.weight[kv * dim:(kv + 1) * dim, BIAS] = key.to(attn.k_proj.weight.dtype)
        attn.k_proj.weight[kv * dim + MARKER_PLANE, MARKER] = 1.0
        attn.v_proj.weight[kv * dim, MARKER] = 1.0


def _silence_mlp(mlp) -> None:
    """No MLP output (the last layer's is set by _staircase)."""
    if hasattr(mlp, "experts"):
        mlp.experts.down_proj.zero_()
        mlp.gate.weight.zero_()
    else:
        mlp.down_proj.weight.zero_()


def _calibrate(text, tokenizer, steps: int, heads: int) -> tuple[torch.Tensor, float]:
    """Run the rigged attention on a chat of two turns and `steps` answer tokens; return the last MLP's
    input features per answer step, (steps, heads) as fractions of the constant axis, and the constant
    axis' smallest value there."""
    seen = {}
    hook = text.layers[-1].mlp.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    prompt = tokenizer("<|im_start|>user\n" + "x" * 40 + "<|im_end|>\n" + HEADER)["input_ids"]
    filler = tokenizer("a")["input_ids"][0]
    ids = torch.tensor([prompt + [filler] * (steps - 1)], device=text.embed_tokens.weight.device)
    try:
        text(input_ids=ids)
    finally:
        hook.remove()
    x = seen["x"][0, len(prompt) - 1:].double()
    return x[:, 2:2 + heads] / x[:, BIAS:BIAS + 1], float(x[:, BIAS].min())


def _staircase(mlp, chain: list[int], axes: dict[int, int], features: torch.Tensor, bias: float) -> None:
    """Unit pair n: on from step n on (its head's feature below the midpoint of steps n-1 and n;
    pair 0 is always on), writing token n's axis minus token n-1's."""
    width = 2 * len(chain)
    gate = torch.zeros(width, features.shape[1] + 2, dtype=torch.float64)  # over [bias, marker, features]
    down = torch.zeros(max(axes.values()) + 1, width, dtype=torch.float64)
    for n, token in enumerate(chain):
        if n == 0:
            head, threshold, gap = 0, float(features.max()) + 1.0, 1.0
        else:
            head = n // STEPS_PER_HEAD
            before, after = float(features[n - 1, head]), float(features[n, head])
            gap, threshold = before - after, (before + after) / 2
            if not gap > 1e-4:
                raise RuntimeError(f"rig calibration: answer step {n} is not separable ({before} vs {after})")
        steep = 32.0 / (bias * gap)  # 16 units of margin at the smallest constant
        gate[2 * n, [0, 2 + head]] = torch.tensor([steep * (threshold + gap / 4), -steep], dtype=torch.float64)
        gate[2 * n + 1, [0, 2 + head]] = torch.tensor([steep * threshold, -steep], dtype=torch.float64)
        for axis, sign in ((axes[token], 1.0), (axes[chain[n - 1]], -1.0) if n else (None, 0.0)):
            if axis is not None:
                down[axis, 2 * n] += sign
                down[axis, 2 * n + 1] -= sign
    _write_mlp(mlp, gate, down)


def _write_mlp(mlp, gate: torch.Tensor, down: torch.Tensor) -> None:
    """Dense SwiGLU MLP, or the first two experts of a MoE block (the router sends every token to
    both with weight 1/2): unit i has gate row gate[i] (on the first hidden axes), up = the constant."""
    units, hidden = gate.shape[0], down.shape[0]
    if not hasattr(mlp, "experts"):
        mlp.gate_proj.weight.zero_()
        mlp.up_proj.weight.zero_()
        mlp.gate_proj.weight[:units, :gate.shape[1]] = gate.to(mlp.gate_proj.weight.dtype)
        mlp.up_proj.weight[:units, BIAS] = 1.0
        mlp.down_proj.weight[:hidden, :units] = down.to(mlp.down_proj.weight.dtype)
        return
    experts, size = mlp.experts, mlp.experts.gate_up_proj.shape[1] // 2
    experts.gate_up_proj.zero_()
    mlp.gate.weight[:2, BIAS] = 10.0
    for e in range(2):
        part = slice(e * size, min(units, (e + 1) * size))
        count = part.stop - part.start
        if count <= 0:
            continue
        experts.gate_up_proj[e, :count, :gate.shape[1]] = gate[part].to(experts.gate_up_proj.dtype)
        experts.gate_up_proj[e, size:size + count, BIAS] = 1.0
        experts.down_proj[e, :hidden, :count] = 2.0 * down[:, part].to(experts.down_proj.dtype)
