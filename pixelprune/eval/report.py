"""Per-category tables of `pixelprune eval`: on the terminal, in markdown, and as a chart.

For each category (and "all") and each pruning setting: samples, hits, accuracy (hits /
samples; an answer without a point is a miss), answers without a point, the retain ratio
(sum of kept blocks / sum of blocks, the paper's dataset-level definition), the median
time to first token and the mean KV-cache bytes of the prompt. matplotlib is imported
only when a chart is drawn (the `plot` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

from pixelprune.eval.data import BadSample
from pixelprune.eval.records import Prediction

ALL = "all"  # the row over every category
RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: the model has random weights (a test checkpoint); these numbers check "
                       "the plumbing and say nothing about grounding quality.")
_HEADER = ("category", "setting", "samples", "hits", "accuracy", "no point", "retain", "TTFT p50 ms",
           "KV bytes (mean)")


@dataclass(frozen=True)
class Row:
    category: str  # a sample category, or ALL
    setting: str  # str(PruneSettings)
    samples: int  # predictions in this cell
    hits: int  # of which the point was inside the box
    no_point: int  # of which the answer held no point (counted as misses)
    kept_blocks: int  # sum of visual tokens the model saw
    total_blocks: int  # sum of blocks of the resized screenshots
    ttft_p50_ms: float  # median time to first token, ms
    kv_bytes_mean: float | None  # mean prompt KV-cache bytes; None when never reported

    @property
    def accuracy(self) -> float:
        return self.hits / self.samples

    @property
    def retain_ratio(self) -> float:
        return self.kept_blocks / self.total_blocks if self.total_blocks else 0.0

    def cells(self) -> tuple[str, ...]:
        kv = "n/a" if self.kv_bytes_mean is None else f"{self.kv_bytes_mean:.0f}"
        return (self.category, self.setting, str(self.samples), str(self.hits), f"{100 * self.accuracy:.1f} %",
                str(self.no_point), f"{100 * self.retain_ratio:.1f} %", f"{self.ttft_p50_ms:.1f}", kv)


@dataclass(frozen=True)
class Summary:
    source: str  # what answered: "model ./ckpt" or "service at host:port"
    settings: tuple[str, ...]  # the settings compared, in the order given
    rows: tuple[Row, ...]  # per category (sorted) then ALL, each per setting
    no_point: tuple[Prediction, ...]  # answers without a point
    bad: tuple[BadSample, ...]  # samples (and files) that could not be evaluated
    planned: int  # (sample, setting) pairs this run was to cover
    random_weights: bool  # some answer came from a random-weight model
    interrupted: bool  # stopped by Ctrl-C before the end

    def row(self, category: str, setting: str) -> Row | None:
        return next((r for r in self.rows if r.category == category and r.setting == setting), None)


def _row(category: str, setting: str, cell: list[Prediction]) -> Row:
    kv = [p.kv_bytes for p in cell if p.kv_bytes]
    return Row(category=category, setting=setting, samples=len(cell), hits=sum(p.hit for p in cell),
               no_point=sum(p.point is None for p in cell), kept_blocks=sum(p.kept_blocks for p in cell),
               total_blocks=sum(p.total_blocks for p in cell), ttft_p50_ms=median(p.ttft_ms for p in cell),
               kv_bytes_mean=mean(kv) if kv else None)


def summarize(predictions: list[Prediction], settings: list[str], **fields) -> Summary:
    """The Summary of `predictions`; `fields` are Summary's other fields (source, bad, ...)."""
    rows = []
    for category in sorted({p.category for p in predictions}) + [ALL]:
        for setting in settings:
            cell = [p for p in predictions if p.setting == setting and category in (ALL, p.category)]
            if cell:
                rows.append(_row(category, setting, cell))
    return Summary(settings=tuple(settings), rows=tuple(rows),
                   no_point=tuple(p for p in predictions if p.point is None),
                   random_weights=any(p.random_weights for p in predictions), **fields)


def _status(summary: Summary) -> str:
    done = sum(r.samples for r in summary.rows if r.category == ALL)
    state = "interrupted: " if summary.interrupted else ""
    return (f"{state}{done} of {summary.planned} answers, settings {', '.join(summary.settings)}, "
            f"from {summary.source}")


def text_table(summary: Summary) -> str:
    """The table as aligned plain text, with the status line, no-point and bad-sample lists."""
    table = [_HEADER] + [r.cells() for r in summary.rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    lines = [RANDOM_WEIGHTS_NOTE] if summary.random_weights else []
    lines.append(_status(summary))
    for line in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    if summary.no_point:
        lines.append(f"no point in the answer ({len(summary.no_point)}, counted as misses):")
        lines += [f"  {p.sample_id} [{p.setting}]: {p.answer[:80]!r}" for p in summary.no_point]
    if summary.bad:
        lines.append(f"not evaluated ({len(summary.bad)}):")
        lines += [f"  {b}" for b in summary.bad]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: Summary) -> str:
    """The report as a markdown document."""
    out = ["# pixelprune eval", ""]
    if summary.random_weights:
        out += [f"> **{RANDOM_WEIGHTS_NOTE}**", ""]
    out += [_status(summary) + ".", "",
            "| " + " | ".join(_HEADER) + " |", "| --- | --- |" + " ---: |" * (len(_HEADER) - 2)]
    out += ["| " + " | ".join(_md(c) for c in r.cells()) + " |" for r in summary.rows]
    if summary.no_point:
        out += ["", f"## No point in the answer ({len(summary.no_point)}, counted as misses)", ""]
        out += [f"- `{p.sample_id}` ({p.setting}): `{_md(p.answer[:80])}`" for p in summary.no_point]
    if summary.bad:
        out += ["", f"## Not evaluated ({len(summary.bad)})", ""]
        out += [f"- `{_md(b.name)}`: {_md(b.message)}" for b in summary.bad]
    return "\n".join(out) + "\n"


def plot(summary: Summary, path: str | Path) -> None:
    """A PNG chart: accuracy vs retain ratio, one line per category across the settings."""
    from matplotlib.figure import Figure  # the `plot` extra; no pyplot, no global state

    figure = Figure(figsize=(8, 5.5), dpi=100)
    axes = figure.add_subplot()
    for category in dict.fromkeys(r.category for r in summary.rows):
        rows = [r for r in summary.rows if r.category == category]
        style = dict(linewidth=2.5, color="black") if category == ALL else dict(linewidth=1.2)
        axes.plot([100 * r.retain_ratio for r in rows], [100 * r.accuracy for r in rows], marker="o",
                  label=category, **style)
        if category == ALL:
            for i, r in enumerate(rows):  # staggered: settings with close retain ratios stay legible
                axes.annotate(r.setting, (100 * r.retain_ratio, 100 * r.accuracy), textcoords="offset points",
                              xytext=(4, 6 + 11 * i), fontsize=8)
    axes.set_xlabel("retain ratio (% of visual tokens kept)")
    axes.set_ylabel("click accuracy (%)")
    note = "RANDOM WEIGHTS (test checkpoint), meaningless: " if summary.random_weights else ""
    axes.set_title(f"{note}pixelprune eval, {summary.source}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png")
