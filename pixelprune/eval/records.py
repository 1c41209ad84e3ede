"""Answers, scored predictions and the resumable `--jsonl` file of `pixelprune eval`.

One JSON object per line and per (sample, setting):

    {"sample_id": "screenspot_mobile_v2:7", "setting": "pred2d:max:0.02", "category": "mobile/icon",
     "point": [412.5, 96.0], "hit": true, "retain": 0.41, "kept_blocks": 310, "total_blocks": 756,
     "ttft_ms": 88.1, "kv_bytes": 1835008, "answer": "{\"point_2d\": [322, 45]}", "random_weights": false}

`point` is in pixels of the screenshot (null when the answer held no point: a miss);
`kv_bytes` is null when the service did not report it. Lines are flushed as they are
written, so an interrupted run keeps what it did, and a rerun with the same file skips
the (sample, setting) pairs already there.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pixelprune.eval.data import Sample


@dataclass(frozen=True)
class Answer:
    point: tuple[float, float] | None  # the click, pixels of the screenshot; None = no point in the answer
    raw_answer: str  # the model's text
    kept_blocks: int  # visual tokens (32x32 blocks) the model saw
    total_blocks: int  # blocks of the resized screenshot
    ttft_ms: float  # time to first token, ms (service: arrival to first token)
    kv_bytes: int | None  # key+value bytes of the prompt's KV cache; None = not reported
    random_weights: bool  # the model has random weights: the answer means nothing
    answer_logprob: float | None = None  # sum of the answer tokens' natural-log probabilities; None = not reported


@dataclass(frozen=True)
class Prediction:
    sample_id: str  # Sample.sample_id
    setting: str  # str(PruneSettings): "full", "pred2d:max:0", "pred2d:max:0.02"
    category: str  # the sample's category
    point: tuple[float, float] | None  # the click, pixels of the screenshot; None = no point (a miss)
    hit: bool  # the point lies inside the target box (edges included)
    retain: float  # kept_blocks / total_blocks
    kept_blocks: int  # visual tokens the model saw
    total_blocks: int  # blocks of the resized screenshot
    ttft_ms: float  # time to first token, ms
    kv_bytes: int | None  # prompt KV-cache bytes; None = not reported
    answer: str  # the model's text
    random_weights: bool  # from a random-weight checkpoint: meaningless
    answer_logprob: float | None = None  # the model's confidence: sum of the answer tokens' log-probabilities

    @property
    def key(self) -> tuple[str, str]:
        return self.sample_id, self.setting

    def to_json(self) -> dict:
        data = asdict(self)
        data["point"] = None if self.point is None else list(self.point)
        return data

    @classmethod
    def from_json(cls, data) -> "Prediction":
        """A Prediction from a decoded JSONL line; ValueError when it is not one."""
        try:
            point = data["point"]
            return cls(sample_id=str(data["sample_id"]), setting=str(data["setting"]), category=str(data["category"]),
                       point=None if point is None else (float(point[0]), float(point[1])), hit=bool(data["hit"]),
                       retain=float(data["retain"]), kept_blocks=int(data["kept_blocks"]),
                       total_blocks=int(data["total_blocks"]), ttft_ms=float(data["ttft_ms"]),
                       kv_bytes=None if data["kv_bytes"] is None else int(data["kv_bytes"]),
                       answer=str(data["answer"]), random_weights=bool(data["random_weights"]),
                       answer_logprob=None if data.get("answer_logprob") is None else float(data["answer_logprob"]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"not a prediction ({exc!r})") from None


def is_hit(point: tuple[float, float] | None, box: tuple[float, float, float, float]) -> bool:
    """True when the point lies inside (x1, y1, x2, y2), edges included; no point is a miss."""
    if point is None:
        return False
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def score(sample: Sample, setting: str, answer: Answer) -> Prediction:
    return Prediction(
        sample_id=sample.sample_id, setting=setting, category=sample.category, point=answer.point,
        hit=is_hit(answer.point, sample.box), retain=answer.kept_blocks / max(answer.total_blocks, 1),
        kept_blocks=answer.kept_blocks, total_blocks=answer.total_blocks, ttft_ms=answer.ttft_ms,
        kv_bytes=answer.kv_bytes, answer=answer.raw_answer, random_weights=answer.random_weights,
        answer_logprob=answer.answer_logprob)


class PredictionLog:
    """The predictions of a run: those already in the `--jsonl` file (resume) plus new ones,
    each appended and flushed as it comes. With path None, kept in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self.done: dict[tuple[str, str], Prediction] = {}  # (sample_id, setting) -> prediction
        self.resumed = 0  # predictions read from the file at start
        self._file = None
        if self.path is not None:
            self._load()
            self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        unreadable, text = 0, self.path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                prediction = Prediction.from_json(json.loads(line))
            except ValueError:  # includes JSON errors: e.g. a line cut short by a kill
                unreadable += 1
                continue
            self.done.setdefault(prediction.key, prediction)
        self.resumed = len(self.done)
        if unreadable or (text and not text.endswith("\n")):  # rewrite: appended lines start on a clean line
            if unreadable:
                print(f"pixelprune eval: warning: {self.path}: dropped {unreadable} unreadable line(s)",
                      file=sys.stderr)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(p.to_json()) + "\n" for p in self.done.values()), encoding="utf-8")
            os.replace(tmp, self.path)

    def add(self, prediction: Prediction) -> None:
        self.done[prediction.key] = prediction
        if self._file is not None:
            self._file.write(json.dumps(prediction.to_json()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
