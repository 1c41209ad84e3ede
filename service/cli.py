"""`pixelprune serve`: flags and PIXELPRUNE_* environment (read in service.config), then serve()."""

from __future__ import annotations

import argparse
import logging
import os

from pixelprune.cli_common import CliError
from pixelprune.model.checkpoint import check_model
from service import config as service_config

log = logging.getLogger("pixelprune.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    service_config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = service_config.from_namespace(args, os.environ)
    check_model(config.spec.model)  # a wrong path or an unreachable hub id: one line, before torch loads
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.server import load_engine, serve  # torch and transformers load here, after the flags are valid

    try:
        engine = load_engine(config)
    except (OSError, ValueError) as exc:  # unreadable files, not a Qwen3-VL checkpoint, bad device or dtype
        raise CliError(f"cannot load model {config.spec.model}: {' '.join(str(exc).split())}") from None
    log.info("model %s on %s (%s), max %d new tokens; sessions in %s; pruning %s",
             config.spec.model, engine.device, str(engine.dtype).replace("torch.", ""), config.spec.max_new_tokens,
             "Redis" if config.redis_url else "this process",
             config.prune)
    if engine.is_random_weights:
        log.warning("%s has RANDOM WEIGHTS (a test checkpoint): its answers carry no meaning", config.spec.model)
    try:
        return serve(config, engine=engine)
    except ValueError as exc:  # a port that cannot be bound, Redis URL refused at start: the flags were valid
        raise CliError(str(exc)) from None
