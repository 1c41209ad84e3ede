"""The pruning settings: one frozen type shared by the core, the model layer, the
service and the CLI, validated once when it is built.

    PruneSettings()                                  # lossless pred2d / max, tau = 0
    PruneSettings(method="raster", metric="mae", tau=0.02)
    PruneSettings.parse("pred2d:max:0.02")           # the CLI / eval spelling; "full" = pruning off
    PruneSettings.OFF                                # keep every block (the stock model's input)

Nothing here imports torch, transformers or grpc.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

METHODS = ("raster", "serpentine", "pred2d")  # scan order / predictor of a block (ALGORITHM.md)
METRICS = ("max", "mae")  # block distance: largest |diff| or mean |diff|, on pixels in [0, 1]
FULL = "full"  # the spelling of "pruning off" in PruneSettings.parse / str()


@dataclass(frozen=True)
class PruneSettings:
    enabled: bool = True  # False: keep every block (the stock model's input)
    method: str = "pred2d"  # predictor: one of METHODS
    metric: str = "max"  # block distance: one of METRICS
    tau: float = 0.0  # threshold in [0, 1] of the pixel range (max: largest |diff|, mae: mean |diff|); 0 = lossless

    OFF: ClassVar["PruneSettings"]

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown pruning metric {self.metric!r}; expected one of {', '.join(METRICS)}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) \
                or not math.isfinite(self.tau) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"pruning tau must be a finite number in [0, 1], got {self.tau!r}")
        object.__setattr__(self, "tau", float(self.tau))

    @property
    def key(self) -> tuple:
        """A hashable identity for caches: two settings with the same key prune identically."""
        if not self.enabled:
            return (False,)
        return (True, self.method, self.metric, self.tau)

    def __str__(self) -> str:
        return FULL if not self.enabled else f"{self.method}:{self.metric}:{self.tau:g}"

    @classmethod
    def parse(cls, text: str) -> "PruneSettings":
        """"full" (pruning off) or "METHOD[:METRIC[:TAU]]", e.g. "pred2d:max:0.02"; ValueError otherwise."""
        text = text.strip()
        if text == FULL:
            return cls.OFF
        parts = text.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"cannot read pruning settings {text!r}; expected 'full' or METHOD[:METRIC[:TAU]]")
        method, metric = parts[0], parts[1] if len(parts) > 1 else "max"
        try:
            tau = float(parts[2]) if len(parts) > 2 else 0.0
        except ValueError:
            raise ValueError(f"cannot read tau in pruning settings {text!r}") from None
        return cls(method=method, metric=metric, tau=tau)


PruneSettings.OFF = PruneSettings(enabled=False)
