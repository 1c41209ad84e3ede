"""The distillation forward and its loss.

`DistillModel` is one `nn.Module` whose forward runs the teacher (every block, no grad) and
the student (pruned blocks, full-image positions, through `PrunedQwen3VL`) on one batch and
returns both models' logits over the answer tokens only. Everything runs inside that one
forward, so DDP, DeepSpeed and FSDP see an ordinary module (the ViT and the LLM are reached
through it, never around it).

    teacher = a frozen copy of the starting weights (`--method full`; held outside the module's
              parameters: it is neither trained, nor saved, nor sharded), or the student's own
              base weights with the LoRA adapter disabled (`--method lora`: no second copy)
    loss    = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
              per answer token (through the closing <|im_end|>)

With nothing pruned the student's inputs are the teacher's (`PrunedQwen3VL.prepare` hands
the stock inputs back), so both logits are bit-equal; `token_kl`'s gradient is computed as
`T * (softmax(s/T) - softmax(t/T))`, so it is then exactly 0, not merely small.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from pixelprune.distill.batch import IGNORE, keep_masks
from pixelprune.model.adapter import PrunedQwen3VL


def is_peft(model) -> bool:
    """True for a peft PeftModel (False also when peft is not installed)."""
    try:
        from peft import PeftModel
    except ModuleNotFoundError:
        return False
    return isinstance(model, PeftModel)


class _TokenKL(torch.autograd.Function):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row; the gradient w.r.t. the student's logits is
    T * (softmax(s/T) - softmax(t/T)) (exactly 0 when s == t); none flows to the teacher."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        wide = torch.promote_types(student.dtype, torch.float32)  # bf16 logits are widened, float64 kept
        log_q = torch.log_softmax(student.to(wide) / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.to(wide) / temperature, dim=-1)
        p = log_p.exp()
        ctx.save_for_backward(log_q, p)
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return (p * (log_p - log_q)).sum(-1) * temperature * temperature

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_q, p = ctx.saved_tensors
        grad_student = (log_q.exp() - p) * (grad * ctx.temperature).unsqueeze(-1)
        return grad_student.to(ctx.student_dtype), None, None


def token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) logits -> (N,) T^2-scaled KL(teacher || student) per token, at temperature T."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TokenKL.apply(student, teacher.detach(), float(temperature))


@dataclass
class AnswerLogits(ModelOutput):
    """What `DistillModel.forward` returns: K = the longest answer in the batch; column k of every
    (B, K, ...) tensor predicts answer column k (rows with shorter answers are IGNORE there)."""

    student: torch.Tensor | None = None  # (B, K, V) the pruned student's logits
    teacher: torch.Tensor | None = None  # (B, K, V) the full-token teacher's logits (no grad)
    labels: torch.Tensor | None = None  # (B, K) the answer tokens, IGNORE where a row's answer has not begun
    student_ids: torch.Tensor | None = None  # (B, K) the student's (pruned) input tokens at those columns
    teacher_ids: torch.Tensor | None = None  # (B, K) the teacher's input tokens at those columns
    kept_blocks: torch.Tensor | None = None  # (B,) visual tokens the student saw
    total_blocks: torch.Tensor | None = None  # (B,) visual tokens the teacher saw


@dataclass(frozen=True)
class AnswerTerms:
    ce_sum: torch.Tensor  # summed cross-entropy of the student on the labels (grad)
    kl_sum: torch.Tensor  # summed T^2 * KL(teacher || student) (grad)
    tokens: torch.Tensor  # answer tokens counted (int64)
    agree: torch.Tensor  # answer tokens where the student's top-1 is the teacher's (no grad)


def answer_terms(out: AnswerLogits, temperature: float = 1.0) -> AnswerTerms:
    """Sums over the answer tokens of one batch (divide by the global token count to average)."""
    mask = out.labels != IGNORE
    student, teacher, labels = out.student[mask], out.teacher[mask], out.labels[mask]
    ce = F.cross_entropy(student.float(), labels, reduction="sum")
    kl = token_kl(student, teacher, temperature).sum()
    agree = (student.detach().argmax(-1) == teacher.argmax(-1)).sum()
    return AnswerTerms(ce_sum=ce, kl_sum=kl, tokens=mask.sum(), agree=agree)


def answer_width(labels: torch.Tensor) -> int:
    """K: columns from the first answer token of any row to the end; ValueError unless every row's
    answer ends at the last column (left padding)."""
    is_answer = labels != IGNORE
    if not bool(is_answer[:, -1].all()):
        raise ValueError("every row's answer must end at the last column (pad batches on the left)")
    first = int(is_answer.any(0).nonzero()[0])
    return labels.shape[1] - first


class DistillModel(nn.Module):
    """Teacher and pruned student of one batch (see the module docstring).

    `student`: the Qwen3VLForConditionalGeneration being trained, or a peft PeftModel around one;
    `teacher`: a frozen copy for `--method full`, None for LoRA (the adapter is disabled instead).
    The student's keep masks come with each batch (`keep`, from the Collator)."""

    accepts_loss_kwargs = True  # transformers.Trainer then counts answer tokens over the global batch

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        if teacher is None and not is_peft(student):
            raise ValueError("a plain student needs a teacher copy (only a LoRA student can be its own teacher)")
        self._teacher = (teacher,)  # a tuple: not a submodule (not trained, saved, moved or sharded)
        self.pruned = PrunedQwen3VL(self.base)

    @property
    def base(self) -> nn.Module:
        """The Qwen3VLForConditionalGeneration the student runs (the LoRA layers are inside it). A
        property, not an attribute: registered once, as `student`, the weights have one name each."""
        return self.student.get_base_model() if is_peft(self.student) else self.student

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def _teacher_context(self):
        return self.student.disable_adapter() if self.teacher is None else nullcontext()

    def forward(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, keep,
                labels) -> AnswerLogits:
        """Answer logits of teacher and student for one Collator batch (the caller computes the loss)."""
        width = answer_width(labels)
        stock = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
                 "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        teacher_model = self.base if self.teacher is None else self.teacher
        with torch.no_grad(), self._teacher_context():
            teacher = teacher_model(**stock, logits_to_keep=width + 1, use_cache=False).logits
        masks = keep_masks(keep, image_grid_thw)
        prepared = self.pruned.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                       keep=masks)
        student_ids = prepared.model_kwargs["input_ids"]
        student = self.base(**prepared.model_kwargs, logits_to_keep=width + 1, use_cache=False).logits
        device = input_ids.device
        return AnswerLogits(student=student[:, :-1], teacher=teacher[:, :-1], labels=labels[:, -width:],
                            student_ids=student_ids[:, -width:], teacher_ids=input_ids[:, -width:],
                            kept_blocks=torch.tensor([int(m.sum()) for m in masks], device=device),
                            total_blocks=torch.tensor([m.size for m in masks], device=device))
