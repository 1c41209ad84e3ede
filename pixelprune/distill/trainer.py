"""The training loop: `transformers.Trainer` with the distillation loss, the student saved in
its own format, a progress bar of CE and KL per answer token, and Ctrl-C = save and stop.

Loss normalisation (transformers 5.25, `Trainer.training_step` / `_get_num_items_in_batch`):
because `DistillModel.accepts_loss_kwargs` is True and batches carry `labels`, the Trainer
counts the answer tokens of every micro-batch of one optimizer step, over all processes
(`average_tokens_across_devices`), and passes that count as `num_items_in_batch`. Each
micro-batch's loss is its token SUM divided by that global count (times the number of
processes, which DDP / DeepSpeed / FSDP divide the gradients by again), so the step's
gradient is that of the mean over every answer token of the global batch, whatever the
padding, the micro-batch split or the device count; `loss_is_scaled_for_ga = True` tells
the Trainer not to divide by the accumulation steps a second time.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pixelprune.distill.model import answer_terms, is_peft

STUDENT_PREFIX = "student."  # DistillModel's state-dict prefix of the student's own keys


class DistillTrainer(Trainer):
    """Trainer over a DistillModel: alpha * CE + (1 - alpha) * T^2 * KL per answer token."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated, global batch

    def __init__(self, *args, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self._running = None  # float64 (3,) on the device: CE sum, KL sum, answer tokens since the last log
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        terms = answer_terms(out, self.temperature)
        loss = terms.ce_sum.new_zeros(())
        if self.alpha > 0:
            loss = loss + self.alpha * terms.ce_sum
        if self.alpha < 1:
            loss = loss + (1.0 - self.alpha) * terms.kl_sum
        if num_items_in_batch is None:  # a batch on its own: its own tokens
            loss = loss / terms.tokens.clamp(min=1)
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # gradients are averaged over processes
        sums = torch.stack([terms.ce_sum.detach().double(), terms.kl_sum.detach().double(), terms.tokens.double()])
        self._running = sums if self._running is None else self._running + sums  # no device sync per batch
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `ce` and `kl` (per answer token since the last log, all processes) to training logs."""
        if "loss" in logs:
            totals = torch.zeros(3, dtype=torch.float64, device=self.args.device) if self._running is None \
                else self._running.to(self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            ce, kl, tokens = totals.tolist()
            if tokens > 0:
                logs["ce"], logs["kl"], logs["answer_tokens"] = ce / tokens, kl / tokens, int(tokens)
            self._running = None
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student in its own format (a transformers checkpoint, or a peft adapter), not the
        wrapper's state dict: tied embeddings stay tied and the files load with from_pretrained."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        student = self.accelerator.unwrap_model(self.model).student
        if state_dict is not None:  # gathered by DeepSpeed / FSDP: the wrapper's keys
            state_dict = {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
        student.save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, Path(output_dir) / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the student's files written by `_save` (DeepSpeed and FSDP have their own)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        student = self.accelerator.unwrap_model(model if model is not None else self.model).student
        load_student(student, Path(resume_from_checkpoint))


def load_student(student, folder: Path) -> None:
    """Load weights saved by `student.save_pretrained(folder)` into `student` in place."""
    if is_peft(student):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(student, load_file(folder / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise ValueError(f"{folder}: adapter weights that fit no layer, e.g. {result.unexpected_keys[0]}")
        return
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(folder / name))
    result = student.load_state_dict(state, strict=False)
    tied = set(student._tied_weights_keys or {}) if getattr(student.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]  # a tied lm_head is saved once, as the embedding
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


class DistillProgress(TrainerCallback):
    """One tqdm bar (main process) with CE and KL per answer token, running over the last
    `window` optimizer steps (weighted by their answer tokens)."""

    def __init__(self, file=None, window: int = 20):
        self.file = file
        self.bar = None
        self.recent: deque = deque(maxlen=window)  # (CE sum, KL sum, answer tokens) per logged step

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="pixelprune distill", unit="step",
                            file=self.file, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "kl" not in logs:
            return
        tokens = logs["answer_tokens"]
        self.recent.append((logs["ce"] * tokens, logs["kl"] * tokens, tokens))
        total = sum(t for _, _, t in self.recent)
        self.bar.set_postfix(ce=f"{sum(c for c, _, _ in self.recent) / total:.4f}",
                             kl=f"{sum(k for _, k, _ in self.recent) / total:.4f}",
                             lr=f"{logs.get('learning_rate', 0.0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnInterrupt(TrainerCallback):
    """First Ctrl-C: finish the optimizer step, save a resumable checkpoint, stop. A second one
    aborts at once (KeyboardInterrupt). Every process stops at the same step."""

    def __init__(self, notice=print):
        self.requested = False
        self.stopped_at: int | None = None  # the step a Ctrl-C stopped training after
        self._notice = notice
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._notice("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort at once)")

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.requested, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _any_process(flag: bool, device) -> bool:
    """True when `flag` is set on any process (one all-reduce when distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
