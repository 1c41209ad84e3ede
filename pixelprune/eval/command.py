"""`pixelprune eval DATA`: click accuracy with and without pruning, per category.

    pixelprune eval screenspot_v2/ --images screenspot_v2/screenspotv2_image --model Qwen/Qwen3-VL-2B-Instruct \\
        --settings full,pred2d:max:0,pred2d:max:0.02 --markdown eval.md --jsonl eval.jsonl --plot eval.png
    pixelprune eval screenspot_v2/ --target grounding.example:50051 --tls --token-file token ...

Every sample runs under every setting. The table (terminal and --markdown) has accuracy,
retain ratio, TTFT p50 and KV bytes per category and setting; --jsonl holds every
prediction and makes the run resumable; Ctrl-C stops and writes what is done. Exit
status: 0; 1 when some samples could not be evaluated (listed) or a failure ended the
run; 2 for a wrong command line (pixelprune.cli_common); 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pixelprune.cli_common import EXIT_INTERRUPTED, EXIT_RUNTIME, CliError, UsageError, with_default
from pixelprune.eval.data import FORMATS, BadSample, Sample, check_box, choose, load_dataset
from pixelprune.eval.records import PredictionLog, score
from pixelprune.eval.report import markdown, plot, summarize, text_table
from pixelprune.eval.runners import EngineRunner, RunnerFailed, SampleFailed, ServiceRunner, unreadable_image
from pixelprune.model.checkpoint import check_model
from pixelprune.profiles import AUTO, get_profile
from pixelprune.settings import PruneSettings

DEFAULT_SETTINGS = "full,pred2d:max:0,pred2d:max:0.02"


def parse_settings(text: str) -> list[PruneSettings]:
    """'full,pred2d:max:0,...' -> the distinct settings, in order (ValueError on a bad one)."""
    chosen: dict[str, PruneSettings] = {}
    for part in text.split(","):
        if part.strip():
            settings = PruneSettings.parse(part)
            chosen.setdefault(str(settings), settings)
    if not chosen:
        raise ValueError("--settings is empty; give e.g. full,pred2d:max:0")
    return list(chosen.values())


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file, from its header; ValueError (one line) when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ValueError(f"image {path} not found") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(unreadable_image(path, exc)) from None


def _report(bad: BadSample) -> None:
    tqdm.write(f"pixelprune eval: error: {bad}", file=sys.stderr)


def evaluate(samples: list[Sample], settings: list[PruneSettings], runner, log: PredictionLog, bad: list,
             bar=None) -> None:
    """Answer and score every (sample, setting) pair not yet in `log`; bad samples go to `bad`.
    `runner.answer` may raise SampleFailed (recorded, the run goes on) or anything else (ends it)."""
    for sample in samples:
        todo = [s for s in settings if (sample.sample_id, str(s)) not in log.done]
        if not todo:
            continue
        try:
            check_box(sample, image_size(sample.image))
        except ValueError as exc:
            bad.append(BadSample(sample.sample_id, str(exc)))
            _report(bad[-1])
            if bar is not None:
                bar.update(len(todo))
            continue
        for setting in todo:
            try:
                answer = runner.answer(sample.image, sample.instruction, setting)
            except SampleFailed as exc:
                bad.append(BadSample(f"{sample.sample_id} [{setting}]", str(exc)))
                _report(bad[-1])
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            log.add(score(sample, str(setting), answer))


def read_token(token_file: str | None) -> str | None:
    """The bearer token in `token_file` (stripped), or None without a file."""
    if token_file is None:
        return None
    token = Path(token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise UsageError(f"--token-file {token_file} is empty")
    return token


def _check_runner_arguments(args: argparse.Namespace) -> None:
    """Options that go with --model only, or with --target only (usage errors)."""
    if args.model is not None:
        remote = [flag for flag, value in (("--token-file", args.token_file), ("--tls", args.tls),
                                           ("--tls-ca", args.tls_ca)) if value]
        if remote:
            raise UsageError(f"{', '.join(remote)} go{'es' if len(remote) == 1 else ''} with --target, not --model")
    elif args.device is not None or args.dtype is not None:
        raise UsageError("--device and --dtype go with --model; the service has its own")
    elif args.profile is not None:
        raise UsageError("--profile goes with --model; the service has its own (pixelprune serve --profile)")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    if args.profile not in (None, AUTO):
        try:
            get_profile(args.profile)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def open_runner(args: argparse.Namespace):
    """The runner --model or --target asks for (loads the model, or opens the channel)."""
    _check_runner_arguments(args)
    try:
        if args.model is not None:
            check_model(args.model)  # a wrong path or an unreachable hub id: one line, before torch loads
            return EngineRunner(args.model, device=args.device or "auto", dtype=args.dtype or "auto",
                                profile=args.profile or "auto")
        tls = args.tls_ca or args.tls or None
        return ServiceRunner(args.target, token=read_token(args.token_file), tls=tls, timeout=args.timeout)
    except RunnerFailed as exc:
        raise CliError(str(exc)) from None


def _write_outputs(args, summary) -> None:
    print(text_table(summary))
    if args.markdown:
        Path(args.markdown).write_text(markdown(summary), encoding="utf-8")
    if args.plot:
        plot(summary, args.plot)


def _check_plot_extra(args) -> None:
    """Fail before a long run, not after it, when --plot cannot be drawn."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError as exc:
            raise CliError(f"{exc}; --plot needs the 'plot' extra: pip install 'pixelprune[plot]'") from None


def _select(args: argparse.Namespace) -> tuple[list[PruneSettings], list[BadSample], list[Sample]]:
    """(settings, bad annotations, samples to run), every argument checked before a model loads."""
    settings = parse_settings(args.settings)
    dataset = load_dataset(args.data, args.format, args.images)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    samples = choose(dataset.samples, categories, args.limit, args.seed)
    _check_plot_extra(args)
    if not samples:  # nothing to run: one error, which is the bad file itself when there is one
        if len(dataset.bad) == 1:
            raise UsageError(str(dataset.bad[0]))
        for item in dataset.bad:
            _report(item)
        raise UsageError(f"no samples to evaluate in {args.data}")
    for item in dataset.bad:
        _report(item)
    return settings, list(dataset.bad), samples


def _run_all(samples, settings, runner, log: PredictionLog, bad: list, planned: set, jsonl) -> tuple[bool, Exception]:
    """evaluate() under a progress bar: (interrupted by Ctrl-C, the error that ended the run or None)."""
    already = sum(key in planned for key in log.done)
    if already:
        print(f"resuming: {already} of {len(planned)} answers already in {jsonl}", file=sys.stderr)
    bar = tqdm(total=len(planned), initial=already, desc="pixelprune eval", unit="answer", file=sys.stderr,
               dynamic_ncols=True)
    try:
        evaluate(samples, settings, runner, log, bad, bar)
    except KeyboardInterrupt:
        return True, None
    except Exception as exc:  # noqa: BLE001 - RunnerFailed or a model error: report what was done first
        return False, exc
    finally:
        bar.close()
    return False, None


def run(args: argparse.Namespace) -> int:
    settings, bad, samples = _select(args)
    planned = {(s.sample_id, str(p)) for s in samples for p in settings}
    with closing(PredictionLog(args.jsonl)) as log:
        runner = open_runner(args)
        try:
            interrupted, fatal = _run_all(samples, settings, runner, log, bad, planned, args.jsonl)
        finally:
            runner.close()
    done = [p for key, p in log.done.items() if key in planned]
    _write_outputs(args, summarize(done, [str(s) for s in settings], source=runner.source, bad=tuple(bad),
                                   planned=len(planned), interrupted=interrupted))
    if isinstance(fatal, RunnerFailed):
        raise CliError(f"stopped after {len(done)} of {len(planned)} answers: {fatal}")
    if fatal is not None:
        raise fatal
    return EXIT_INTERRUPTED if interrupted else (EXIT_RUNTIME if bad else 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="annotation JSON file, or a folder of them (searched recursively)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", metavar="DIR_OR_HUB_ID",
                     help="run this Qwen3-VL checkpoint in process: a checkpoint directory or a Hugging Face hub id")
    who.add_argument("--target", metavar="HOST:PORT", help="ask a running `pixelprune serve` instead")
    model = parser.add_argument_group("with --model")
    model.add_argument("--device", help=with_default("cpu, cuda, cuda:N", "auto"))
    model.add_argument("--dtype", help=with_default("float32, bfloat16, float16; auto = bfloat16 on CUDA, float32 "
                                                    "on CPU", "auto"))
    model.add_argument("--profile", metavar="NAME", help=with_default(
        "the model family's prompt and answer coordinates: qwen3-vl, gui-owl, ui-venus, mai-ui, stepgui, holo2, or "
        "auto (from the checkpoint's name and card)", "auto"))
    served = parser.add_argument_group("with --target (the options of pixelprune-agent)")
    served.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    served.add_argument("--tls-ca", metavar="FILE", help="PEM root certificate(s): use TLS and trust these")
    served.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    served.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help=with_default("deadline of one request incl. retries, seconds", 60))
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help=with_default("comma-separated pruning settings, 'full' = off", DEFAULT_SETTINGS))
    parser.add_argument("--format", choices=FORMATS, help=with_default("annotation format", "detected per file"))
    parser.add_argument("--images", metavar="DIR", help=with_default("folder img_filename is relative to",
                                                                     "the annotation file's folder"))
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--jsonl", metavar="FILE", help="every prediction, one JSON per line; a rerun resumes")
    parser.add_argument("--plot", metavar="FILE", help="PNG chart of accuracy vs retain ratio per category")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N samples (after --seed)")
    parser.add_argument("--categories", metavar="A,B", help="only these categories, e.g. mobile,icon or Dev/text")
    parser.add_argument("--seed", type=int, help="shuffle the samples with this seed before --limit")
