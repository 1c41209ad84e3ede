"""`pixelprune distill DATA... --model BASE --out DIR`: self-distillation so that pruning stops
costing grounding accuracy.

    pixelprune distill screenspot_train.json --model Qwen/Qwen3-VL-2B-Instruct --out distilled \\
        --heldout 0.05 --labels teacher --max-steps 2000 --batch-size 4 --grad-accum 9 --report distill.json
    torchrun --nproc-per-node 8 -m pixelprune.cli distill ... --deepspeed pixelprune/distill/configs/zero2.json

The student (the base's weights, trained) sees only the blocks `--settings` keeps, with the
full image's positions; the teacher (the base's weights, frozen) sees every block. Steps:
read and check the data (nothing loads before every refusal has had its say); the teacher's
greedy answers (`--labels teacher`, and on the held-out part) and the held-out metrics
"before"; training (transformers.Trainer; Ctrl-C saves a resumable checkpoint); the plain
checkpoint in --out (LoRA merged) with its provenance (distill.json) and README; the held-out
metrics "after", measured on that checkpoint as loaded from disk. Exit status 0, 130 after
Ctrl-C (resume with --resume), 2 on an error (one line).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from pixelprune.cli_common import CliError, UsageError
from pixelprune.distill.data import FORMATS
from pixelprune.distill.plan import STATE, TrainPlan
from pixelprune.distill.prepare import heldout_fraction, prepare_data
from pixelprune.settings import PruneSettings

CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped DeepSpeed ZeRO-2 and FSDP configs
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch number their processes in RANK
DEFAULTS = {"alpha": 0.5, "temperature": 1.0, "max_steps": 2000, "lr": 1e-5, "batch_size": 1, "grad_accum": 1,
            "save_steps": 500, "lora_rank": 16, "seed": 0, "answer_tokens": 24}


def say(text: str) -> None:
    """One line on stderr, from the first process only (torchrun / accelerate launch start several)."""
    if MAIN_PROCESS:
        tqdm.write(f"pixelprune distill: {text}", file=sys.stderr)


def _plan(args) -> TrainPlan:
    checks = [(0.0 <= args.alpha <= 1.0, f"--alpha must be in [0, 1], got {args.alpha:g}"),
              (args.temperature > 0, f"--temperature must be > 0, got {args.temperature:g}"),
              (args.lr >= 0, f"--lr must be >= 0, got {args.lr:g}"),
              (args.warmup_steps is None or args.warmup_steps >= 0, "--warmup-steps must be >= 0")]
    checks += [(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
               for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "lora_rank", "answer_tokens")]
    checks += [(not (args.deepspeed and args.fsdp), "give --deepspeed or --fsdp, not both"),
               (not (args.fsdp and args.method == "lora"), "--fsdp goes with --method full (LoRA fits one GPU, "
                                                           "or use --deepspeed)")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    warmup = min(100, args.max_steps // 10) if args.warmup_steps is None else args.warmup_steps
    return TrainPlan(method=args.method, lora_rank=args.lora_rank, alpha=args.alpha, temperature=args.temperature,
                     max_steps=args.max_steps, lr=args.lr, warmup_steps=warmup, batch_size=args.batch_size,
                     grad_accum=args.grad_accum, save_steps=args.save_steps, seed=args.seed,
                     answer_tokens=args.answer_tokens,
                     gradient_checkpointing=not args.no_gradient_checkpointing,
                     deepspeed=config_file(args.deepspeed, "--deepspeed"), fsdp=config_file(args.fsdp, "--fsdp"))


def config_file(value: str | None, flag: str) -> str | None:
    """A DeepSpeed / FSDP config: a file, or the name of one shipped in pixelprune/distill/configs."""
    if value is None or Path(value).is_file():
        return value
    shipped = CONFIGS / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
    raise UsageError(f"{flag} {value}: no such file (the configs shipped with pixelprune: {names})")


def _check_out(out: Path, resume) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if resume:
        if not (out / STATE).is_file():
            raise UsageError(f"--resume: {out} holds no distillation run to resume ({STATE} missing)")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; choose a new directory, or give --resume to continue a run there")


def _settings(args) -> PruneSettings:
    settings = PruneSettings.parse(args.settings)
    if not settings.enabled and args.alpha == 0:
        raise UsageError("nothing to distil: with --settings full the student sees every block, so the KL term is 0; "
                       "give a pruning setting or --alpha > 0")
    if args.heldout is not None and heldout_fraction(args.heldout) is None and not Path(args.heldout).exists():
        raise UsageError(f"--heldout {args.heldout}: neither a fraction in (0, 1) nor an existing file or folder")
    return settings


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    plan = _plan(args)
    out = Path(args.out)
    _check_out(out, args.resume)
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise UsageError(f"--report {args.report}: its folder does not exist")
    prepared = prepare_data(args.data, args.format, args.images, args.heldout, args.eval_data or [], args.labels,
                            args.seed, report=lambda row: say(f"skipped {row}"))
    say(f"{len(prepared.train)} training rows on {prepared.record['train_screenshots']} screenshots, "
        f"{len(prepared.heldout)} held out ({len(prepared.bad)} skipped)")
    try:
        from pixelprune.distill.run import Run

        job = Run(args.model, out, settings, plan, args.labels, prepared, say)
    except ModuleNotFoundError as exc:
        if plan.deepspeed and "deepspeed" in str(exc):
            raise UsageError("--deepspeed needs the deepspeed package: pip install deepspeed (beside a CUDA build "
                           "of torch)") from None
        raise CliError(f"{exc}; pixelprune distill needs the 'train' extra: pip install 'pixelprune[train]'") from None
    code = job.execute(args.resume)
    gc.collect()
    if code == 0 and args.report and job.record is not None and job.is_main:
        Path(args.report).write_text(json.dumps(job.record, indent=2) + "\n", encoding="utf-8")
    return code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA", help="annotation files or folders to train on "
                                                                f"({', '.join(FORMATS)})")
    parser.add_argument("--model", required=True, metavar="BASE", help="the Qwen3-VL checkpoint to start from "
                                                                       "(hub id or local directory)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the distilled checkpoint goes (a new or "
                                                                    "empty directory; resumable checkpoints inside)")
    parser.add_argument("--images", metavar="DIR", help="folder image paths are relative to (default: each "
                                                        "annotation file's folder)")
    parser.add_argument("--format", choices=FORMATS, help="annotation format (default: detected per file)")
    parser.add_argument("--settings", default="pred2d:max:0", help="the pruning the student is trained for, "
                        "METHOD[:METRIC[:TAU]] as in `pixelprune eval` (default pred2d:max:0)")
    parser.add_argument("--method", choices=("full", "lora"), default="full",
                        help="full: train every weight (frozen teacher copy); lora: a PEFT LoRA adapter on every "
                             "linear layer, merged into the output (default full)")
    parser.add_argument("--lora-rank", type=int, default=DEFAULTS["lora_rank"], help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="weight of the CE term; 1 - alpha "
                        "weighs T^2 * KL(teacher || student) (default 0.5)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="KD temperature T "
                                                                                           "(default 1)")
    parser.add_argument("--labels", choices=("data", "teacher"), default="data",
                        help="answers to train on: the data's (box centre as {\"point_2d\": [x, y]}, or the "
                             "ShareGPT answer), or the full-token teacher's own greedy answer (default data)")
    parser.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="optimizer steps (default 2000)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate of AdamW "
                        "(betas 0.9, 0.95, weight decay 0.01, clip 1.0, cosine; default 1e-5)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 100, or a tenth of "
                                                         "--max-steps when that is smaller)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="rows per device and "
                                                                                       "micro-batch (default 1)")
    parser.add_argument("--grad-accum", type=int, default=DEFAULTS["grad_accum"], help="micro-batches per "
                                                                                       "optimizer step (default 1)")
    parser.add_argument("--save-steps", type=int, default=DEFAULTS["save_steps"], help="a resumable checkpoint every "
                                                                                       "N steps (default 500)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the run in --out from its newest checkpoint (or this one)")
    parser.add_argument("--heldout", metavar="FILE_OR_FRACTION", help="rows to measure on and never train on: an "
                        "annotation file or folder, or a fraction of DATA's screenshots, e.g. 0.1")
    parser.add_argument("--eval-data", action="append", metavar="FILE", help="an evaluation set you will report "
                        "on (repeatable): training refuses any screenshot that is also in it")
    parser.add_argument("--report", metavar="PATH", help="write the run's record (held-out metrics before and after, "
                                                         "loss curve, provenance) as JSON")
    parser.add_argument("--answer-tokens", type=int, default=DEFAULTS["answer_tokens"], help="greedy budget of the "
                        "teacher's answers (--labels teacher, held-out) and of the held-out clicks (default 24)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="data order and --heldout split "
                                                                           "(default 0)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations instead of "
                        "recomputing them (faster, more memory)")
    parser.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed config file for multi-GPU runs, or "
                        "zero2 (the shipped ZeRO-2 config, pixelprune/distill/configs/zero2.json)")
    parser.add_argument("--fsdp", metavar="CONFIG", help="FSDP config file for multi-GPU runs (--method full), or "
                        "fsdp (the shipped one, pixelprune/distill/configs/fsdp.json)")
