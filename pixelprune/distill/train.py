"""Models, Trainer and the exported checkpoint of one distillation run.

Precision: on CUDA the trained weights are float32 (AdamW's updates of ~1e-5 would vanish in
bf16 weights) and the forward runs under bf16 autocast (`TrainingArguments(bf16=True)`); a
LoRA run keeps the frozen base in bf16 and its adapter in float32. On the CPU everything is
float32. The frozen teacher copy of `--method full` has the student's dtype and runs under the
same autocast, so with nothing pruned both compute the same numbers.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoConfig, AutoModelForImageTextToText, TrainingArguments, set_seed

from pixelprune.distill.batch import Collator, TrainItem
from pixelprune.distill.model import DistillModel, is_peft
from pixelprune.distill.plan import TrainPlan
from pixelprune.distill.trainer import DistillProgress, DistillTrainer, StopOnInterrupt
from pixelprune.model.engine import attention_config, resolve_attn_implementation

LORA_TARGETS = "all-linear"  # every linear layer of the ViT, mergers and LLM except lm_head
CHECKPOINTS = "checkpoints"  # --out subfolder of the Trainer's resumable checkpoints
KEEP_CHECKPOINTS = 1  # resumable checkpoints kept on disk (each holds weights and optimizer state)


class ItemDataset(Dataset):
    """The training rows, as the Trainer's map-style dataset (the Collator builds the tensors)."""

    def __init__(self, items: list[TrainItem]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TrainItem:
        return self.items[index]


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """A Qwen3-VL checkpoint on `device` in `dtype` (eval mode); ValueError (one line) otherwise."""
    attn = attention_config(resolve_attn_implementation(None, device))
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load model {path!r}: {' '.join(str(exc).split())}") from None
    if getattr(model.config, "model_type", None) != "qwen3_vl":
        raise ValueError(f"{path!r} is a {model.config.model_type!r} checkpoint, not Qwen3-VL")
    return model.to(device).eval()


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype the checkpoint's config names (the exported weights are cast back to it)."""
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def serving_dtype(device: torch.device) -> torch.dtype:
    """What `pixelprune serve` runs in: bf16 on CUDA, float32 on the CPU (held-out metrics, labels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def training_dtype(method: str, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if method == "lora" and device.type == "cuda" else torch.float32


def _checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def build_model(base, plan: TrainPlan) -> DistillModel:
    """The student (all weights, or a LoRA adapter on the frozen base) and its teacher."""
    teacher = None
    if plan.method == "full":
        teacher = copy.deepcopy(base).requires_grad_(False).eval()
        student = base.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        set_seed(plan.seed)  # the adapter's random init
        config = LoraConfig(r=plan.lora_rank, lora_alpha=2 * plan.lora_rank, lora_dropout=0.0,
                            target_modules=LORA_TARGETS, bias="none")
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5.25 a question it has renamed
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            student = get_peft_model(base, config)
    if plan.gradient_checkpointing:
        _checkpointing(student.get_base_model() if is_peft(student) else student)
    return DistillModel(student, teacher)


def training_arguments(plan: TrainPlan, out: Path, cuda: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS), max_steps=plan.max_steps, per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum, learning_rate=plan.lr, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=plan.warmup_steps,
        optim="adamw_torch", bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="steps",
        save_steps=plan.save_steps, save_total_limit=KEEP_CHECKPOINTS, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], seed=plan.seed, dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False, log_level="warning", deepspeed=plan.deepspeed,
        fsdp=True if plan.fsdp else None, fsdp_config=plan.fsdp)


def make_trainer(plan: TrainPlan, args: TrainingArguments, model: DistillModel, items: list[TrainItem],
                 collator: Collator, notice) -> tuple[DistillTrainer, StopOnInterrupt]:
    if model.teacher is not None:  # under DeepSpeed the student runs in bf16 (no autocast): so does its teacher
        model.teacher.to(args.device, torch.bfloat16 if plan.deepspeed and args.bf16 else None)
    stopper = StopOnInterrupt(notice)
    trainer = DistillTrainer(model=model, args=args, data_collator=collator, train_dataset=ItemDataset(items),
                             callbacks=[DistillProgress(file=sys.stderr), stopper], alpha=plan.alpha,
                             temperature=plan.temperature)
    return trainer, stopper


def export(trainer: DistillTrainer, out: Path, processor, dtype: torch.dtype | None) -> None:
    """Write the trained student to `out` as a plain checkpoint (LoRA merged), with the processor.
    Every process takes part (FSDP gathers the weights); the main process writes."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = None
    if trainer.is_fsdp_enabled:  # the weights are sharded: gather them
        full = trainer.accelerator.get_state_dict(trainer.model)
        state = {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
    if trainer.args.should_save:
        final = model.student.merge_and_unload() if is_peft(model.student) else model.student
        disable = getattr(final, "activation_checkpointing_disable", None) or final.gradient_checkpointing_disable
        disable()
        if state is None and dtype is not None:
            final = final.to(dtype)
        elif state is not None and dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        final.save_pretrained(out, state_dict=state)
        processor.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
