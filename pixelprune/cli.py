"""The `pixelprune` command line.

Each subcommand lives in the module that owns its stage of the data flow; that
module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their subcommand runs, so `pixelprune stats` never imports
torch or transformers. Nothing imports this module: the error types and the one
error format every subcommand shares are in pixelprune.cli_common.
"""

from __future__ import annotations

import importlib
import sys

from pixelprune.cli_common import EXIT_INTERRUPTED, EXIT_RUNTIME, CliError, OneLineParser, report

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "stats": ("pixelprune.stats", "retain ratio of images or folders (dataset level, per category)"),
    "show": ("pixelprune.show", "draw kept and pruned blocks of one image (the paper's Figure 1)"),
    "estimate": ("pixelprune.flops", "FLOPs and KV-cache bytes of Qwen3-VL, full vs pruned"),
    "tiny-checkpoint": ("pixelprune.model.tiny", "write a tiny random-weight Qwen3-VL checkpoint for tests"),
    "serve": ("service.cli", "run the gRPC grounding service"),
    "eval": ("pixelprune.eval.command", "click accuracy per category with and without pruning (ScreenSpot formats)"),
    "distill": ("pixelprune.distill.command", "fine-tune Qwen3-VL on pruned input, taught by its full-token self"),
}
# The extra a subcommand's imports come from, named when they are missing.
EXTRAS = {"tiny-checkpoint": "model", "serve": "service", "eval": "model",  # eval --target: "client"
          "distill": "train"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="pixelprune", description="PixelPrune: lossless visual-token pruning for Qwen3-VL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == chosen:  # import only the module that will run
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                extra = EXTRAS.get(name, "dev")
                print(f"pixelprune {name}: error: {exc}; install the '{extra}' extra: "
                      f"pip install 'pixelprune[{extra}]'", file=sys.stderr)
                return EXIT_RUNTIME
            module.add_arguments(p)
    args = parser.parse_args(argv)
    module = module or importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (CliError, ValueError, OSError) as exc:  # one line; exit 2 for usage, 1 for runtime (cli_common)
        return report(f"pixelprune {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
