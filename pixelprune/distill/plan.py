"""The training plan of one run, as the command line sets it (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

STATE = "distill_state.json"  # in --out: what a resumed run reuses (teacher answers, metrics before)


@dataclass(frozen=True)
class TrainPlan:
    method: str  # "full" (every weight trained, frozen teacher copy) or "lora" (peft adapter, merged at the end)
    lora_rank: int  # LoRA rank r (lora_alpha = 2 r); unused for "full"
    alpha: float  # weight of the CE term; 1 - alpha weighs T^2 * KL
    temperature: float  # KD temperature T
    max_steps: int  # optimizer steps
    lr: float  # peak learning rate (AdamW)
    warmup_steps: int  # linear warm-up steps before the cosine decay
    batch_size: int  # rows per device per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    save_steps: int  # a resumable checkpoint every this many steps
    seed: int  # data order (and LoRA init)
    answer_tokens: int  # greedy budget of the teacher's answers (--labels teacher, held-out) and held-out clicks
    gradient_checkpointing: bool  # recompute activations in the backward pass (less memory)
    deepspeed: str | None  # DeepSpeed config file (e.g. pixelprune/distill/configs/zero2.json)
    fsdp: str | None  # FSDP config file (pixelprune/distill/configs/fsdp.json)
