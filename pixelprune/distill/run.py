"""One distillation run, phase by phase (see `pixelprune.distill.command`):

    teacher    the base, as served: the teacher's greedy answers (`--labels teacher`, held-out)
               and the held-out metrics "before" (cached in --out for --resume)
    train      transformers.Trainer on DistillModel; Ctrl-C = checkpoint and stop
    export     the plain checkpoint in --out (LoRA merged), README, provenance
    after      the held-out metrics of that checkpoint, loaded from disk

Under torchrun / accelerate launch every process runs this; the teacher's training answers are
shared out between processes, the held-out metrics and every file are the main process's.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as transformers_logging

from pixelprune.distill.batch import Collator, TrainItem, pad_id, text_answer_ids
from pixelprune.distill.heldout import measure
from pixelprune.distill.labels import answer_text, greedy_answers
from pixelprune.distill.plan import STATE, TrainPlan
from pixelprune.distill.prepare import Prepared
from pixelprune.distill.report import (PROVENANCE, loss_curve, now, ratio, summary, versions, write_json,
                                       write_readme)
from pixelprune.distill.train import (CHECKPOINTS, build_model, export, load_model, make_trainer,
                                      serving_dtype, stored_dtype, training_arguments, training_dtype)
from pixelprune.model.engine import checkpoint_has_random_weights
from pixelprune.model.processor import load_processor
from pixelprune.settings import PruneSettings


class Run:
    """One `pixelprune distill` run in this process: `Run(...).execute(resume)` -> exit status;
    afterwards `record` holds the provenance (main process, finished runs)."""

    def __init__(self, base: str, out: Path, settings: PruneSettings, plan: TrainPlan, labels: str,
                 prepared: Prepared, say):
        self.base, self.out, self.settings, self.plan = base, out, settings, plan
        self.labels, self.prepared, self.say = labels, prepared, say
        transformers_logging.disable_progress_bar()  # loading / writing bars: ours say what happens
        transformers_logging.set_verbosity_error()
        self.cuda = torch.cuda.is_available()
        self.args = training_arguments(plan, out, self.cuda)
        self.state = self.args.distributed_state
        self.device = self.args.device
        if self.args.n_gpu > 1:  # the Trainer would fall back to nn.DataParallel, which a frozen teacher copy defeats
            raise ValueError(f"{self.args.n_gpu} GPUs are visible to one process: launch one process per GPU "
                             f"(torchrun --nproc-per-node {self.args.n_gpu} -m pixelprune.cli distill ...), or "
                             "choose one with CUDA_VISIBLE_DEVICES")
        self.is_main = self.state.is_main_process
        self.record: dict | None = None
        try:
            self.processor = load_processor(base)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the processor of {base!r}: {' '.join(str(exc).split())}") from None
        self.sizes = {path: info.size for path, info in prepared.infos.items()}
        if plan.fsdp and not self.cuda:
            self._notice("--fsdp: accelerate shards only on CUDA devices; on the CPU this is plain data parallelism")

    # ------------------------------------------------------------------ phases
    def execute(self, resume) -> int:
        started = now()
        cache = self._cached() if resume else None
        checkpoint = self._checkpoint(resume)
        resumed = _checkpoint_step(checkpoint)  # read now: the Trainer rotates old checkpoints away
        if cache is None:
            cache = self._teacher_phase()
        model = load_model(self.base, self.device, training_dtype(self.plan.method, self.device))
        random = checkpoint_has_random_weights(self.base, model.config)
        trainer, stopper = make_trainer(self.plan, self.args, build_model(model, self.plan), self._items(cache),
                                        Collator(self.processor, self.settings, pad_id(model, self.processor)), self._notice)
        trainer.train(resume_from_checkpoint=checkpoint)
        steps = trainer.state.global_step
        if stopper.stopped_at is not None and steps < self.plan.max_steps:
            self._notice(f"stopped at step {steps}; a checkpoint is in {self.out / CHECKPOINTS}: continue with "
                         "the same command and --resume")
            return 130
        export(trainer, self.out, self.processor, stored_dtype(self.base))
        curve = loss_curve(trainer.state.log_history)
        seconds = next((e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e), None)
        del trainer, model
        self._free()
        after = self._after_phase(cache) if self.is_main else None
        if self.is_main:
            self.record = self._record(cache, after, curve, steps, random, started, resumed, seconds)
            write_json(self.out / PROVENANCE, self.record)
            write_readme(self.out, self.record)
            print(summary(self.record))
            self._notice(f"wrote {self.out}: serve it with `pixelprune serve --model {self.out}`")
        self.state.wait_for_everyone()
        return 0

    def _teacher_phase(self) -> dict:
        """The base as served: teacher answers and held-out metrics before; written to STATE."""
        needed = self.labels == "teacher" or (self.is_main and self.prepared.heldout)
        model = load_model(self.base, self.device, serving_dtype(self.device)) if needed else None
        train_answers = None
        if self.labels == "teacher":
            train_answers = self._shared_answers(model, list(self.prepared.train))
        heldout_answers, before = {}, None
        if self.is_main and self.prepared.heldout:
            held = list(self.prepared.heldout)
            found = self._answers(model, held, "teacher answers, held out")
            heldout_answers = {s.sample_id: list(a) for s, a in zip(held, found)}
            before = self._measure(model, model, heldout_answers, "held-out metrics before")
        cache = {"fingerprint": self._fingerprint(), "train_answers": train_answers,
                 "heldout_answers": heldout_answers, "before": before}
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / STATE, cache)
        self.state.wait_for_everyone()
        del model
        self._free()
        return cache

    def _after_phase(self, cache: dict) -> dict | None:
        if not self.prepared.heldout:
            return None
        teacher = load_model(self.base, self.device, serving_dtype(self.device))
        student = load_model(str(self.out), self.device, serving_dtype(self.device))
        return self._measure(teacher, student, cache["heldout_answers"], "held-out metrics after")

    # ------------------------------------------------------------------ helpers
    def _answers(self, model, samples, what: str) -> list[tuple[int, ...]]:
        with tqdm(total=len(samples), desc=what, unit="row", file=sys.stderr, leave=False,
                  disable=not self.is_main) as bar:
            return greedy_answers(model, self.processor, samples, PruneSettings.OFF, self.plan.batch_size,
                                  self.plan.answer_tokens, bar=bar)

    def _shared_answers(self, model, samples) -> dict:
        """The teacher's answers to the training rows, shared out between processes."""
        from accelerate.utils import gather_object

        with self.state.split_between_processes(samples) as mine:
            found = self._answers(model, list(mine), "teacher answers, training")
            pairs = [(s.sample_id, list(a)) for s, a in zip(mine, found)]
        return dict(gather_object(pairs))

    def _measure(self, teacher, student, answers: dict, what: str) -> dict:
        items = [TrainItem(s, tuple(answers[s.sample_id])) for s in self.prepared.heldout]
        texts = {key: answer_text(self.processor, tuple(ids)) for key, ids in answers.items()}
        with tqdm(total=sum(s.box is not None for s in self.prepared.heldout), desc=what, unit="row",
                  file=sys.stderr, leave=False, disable=not self.is_main) as bar:
            return measure(teacher, student, self.processor, items, self.sizes, self.settings, self.plan.batch_size,
                           texts, self.plan.answer_tokens, bar=bar).to_dict()

    def _items(self, cache: dict) -> list[TrainItem]:
        if self.labels == "teacher":
            answers = cache["train_answers"]
            return [TrainItem(s, tuple(answers[s.sample_id])) for s in self.prepared.train]
        return [TrainItem(s, text_answer_ids(self.processor, s.data_answer(self.sizes[s.image])))
                for s in self.prepared.train]

    def _fingerprint(self) -> dict:
        """What must not change between a run and its --resume."""
        data = self.prepared.record
        return {"base": self.base, "method": self.plan.method,
                "lora_rank": self.plan.lora_rank if self.plan.method == "lora" else None,
                "settings": str(self.settings), "alpha": self.plan.alpha, "temperature": self.plan.temperature,
                "labels": self.labels, "answer_tokens": self.plan.answer_tokens,
                "train_images_sha256": data["train_images_sha256"],
                "train_rows": data["train_rows"], "heldout_images_sha256": data["heldout_images_sha256"]}

    def _cached(self) -> dict:
        cache = json.loads((self.out / STATE).read_text(encoding="utf-8"))
        mine = self._fingerprint()
        changed = [k for k in mine if cache["fingerprint"].get(k) != mine[k]]
        if changed:
            key = changed[0]
            raise ValueError(f"--resume: the run in {self.out} was started with {key} = "
                             f"{cache['fingerprint'].get(key)!r}, not {mine[key]!r}; use the same arguments")
        return cache

    def _checkpoint(self, resume) -> str | None:
        if not resume:
            return None
        if isinstance(resume, str):
            if not Path(resume).is_dir():
                raise ValueError(f"--resume {resume}: no such checkpoint directory")
            return resume
        folder = self.out / CHECKPOINTS
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if last is None:  # stopped before its first checkpoint: train from step 0 with what the cache holds
            self._notice(f"--resume: no checkpoint in {folder} yet; training starts at step 0")
        return last

    def _notice(self, text: str) -> None:
        if self.is_main:
            self.say(text)

    def _free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _record(self, cache, after, curve, steps, random, started, resumed, seconds) -> dict:
        before = cache["before"]
        plan = asdict(self.plan)
        return {"tool": "pixelprune distill", "base": self.base, "base_random_weights": random,
                "method": self.plan.method, "settings": str(self.settings), "alpha": self.plan.alpha,
                "temperature": self.plan.temperature, "labels": self.labels, "plan": plan, "steps_done": steps,
                "resumed_from_step": resumed, "train_seconds": seconds,
                "seconds_per_step": seconds / (steps - (resumed or 0)) if seconds and steps > (resumed or 0) else None,
                "data": self.prepared.record, "loss_curve": curve,
                "heldout_metrics": {"before": before, "after": after, "kl_ratio": ratio(before, after)},
                "started": started, "finished": now(), "versions": versions()}


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer step a Trainer checkpoint was saved at (None: not resumed)."""
    if checkpoint is None:
        return None
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
