"""The run's record (provenance in `--out`/distill.json, and the `--report` JSON), the table
printed at the end, and the exported checkpoint's README (which keeps a random-weight base
marked as random: `pixelprune.model.engine.RANDOM_WEIGHTS_MARKER`)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from pixelprune.model.engine import RANDOM_WEIGHTS_MARKER

PROVENANCE = "distill.json"  # the record, inside the exported checkpoint
LOSS_KEYS = ("step", "loss", "ce", "kl", "learning_rate", "grad_norm", "answer_tokens")


def loss_curve(log_history: list[dict]) -> list[dict]:
    """One entry per logged optimizer step: loss, CE and KL per answer token, lr, grad norm."""
    return [{k: entry[k] for k in LOSS_KEYS if k in entry} for entry in log_history if "loss" in entry]


def versions() -> dict:
    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "accelerate", "deepspeed"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def ratio(before: dict | None, after: dict | None) -> float | None:
    """after / before of KL per answer token (None when either is missing or before is 0)."""
    if not before or not after or not before["kl_per_token"]:
        return None
    return after["kl_per_token"] / before["kl_per_token"]


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def summary(record: dict) -> str:
    """The held-out table printed at the end of a run."""
    metrics = record.get("heldout_metrics") or {}
    before, after = metrics.get("before"), metrics.get("after")
    random = " - RANDOM WEIGHTS: meaningless numbers" if record["base_random_weights"] else ""
    if before is None:
        return f"no held-out part (--heldout): nothing measured{random}"
    after = after or {}
    kl_ratio = metrics.get("kl_ratio")
    rows = [f"held-out: {_rows(before['samples'])}, {before['answer_tokens']} answer tokens of the full-token base; "
            f"pruned student ({record['settings']}) vs the full-token base{random}",
            f"{'':26}{'before':>12}{'after':>12}",
            f"{'KL per answer token':26}{before['kl_per_token']:>12.4f}"
            f"{after.get('kl_per_token', float('nan')):>12.4f}" + (f"   ({kl_ratio:.2f}x)" if kl_ratio else ""),
            f"{'top-1 agreement':26}{_percent(before['top1_agreement']):>12}"
            f"{_percent(after.get('top1_agreement')):>12}"]
    if before["click_samples"]:
        rows.append(f"{'click accuracy':26}{_percent(before['click_accuracy']):>12}"
                    f"{_percent(after.get('click_accuracy')):>12}   (full tokens: "
                    f"{_percent(before['full_click_accuracy'])}, {_rows(before['click_samples'])} with a box)")
    return "\n".join(rows)


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_README = """\
# Qwen3-VL self-distilled for pixel pruning{random_heading}

Written by `pixelprune distill` from `{base}`, {method} fine-tuning, {steps} steps: the student saw only
the 32x32 blocks that pruning setting `{settings}` keeps (with the full image's positions), the
teacher (the starting weights) every block; loss alpha * CE + (1 - alpha) * T^2 * KL per answer
token with alpha = {alpha:g}, T = {temperature:g}, labels from the {labels}.

Serve it with `pixelprune serve --model <this folder>`; compare it with the base with
`pixelprune eval DATA --model <this folder> --settings full,{settings}`.
`{provenance}` holds the provenance: base, data digests, settings, steps, loss curve, held-out metrics.
"""

_RANDOM = """
The base checkpoint has random weights (a test checkpoint), and so does this one: its outputs
are meaningless text.
"""


def write_readme(out: Path, record: dict) -> None:
    random = record["base_random_weights"]
    text = _README.format(random_heading=f" — {RANDOM_WEIGHTS_MARKER}" if random else "", base=record["base"],
                          method=record["method"], steps=record["steps_done"], settings=record["settings"],
                          alpha=record["alpha"], temperature=record["temperature"],
                          labels="data" if record["labels"] == "data" else "full-token teacher's greedy answers",
                          provenance=PROVENANCE)
    (out / "README.md").write_text(text + (_RANDOM if random else ""), encoding="utf-8")
