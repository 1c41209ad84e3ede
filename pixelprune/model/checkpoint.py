"""Where `--model` points, checked before anything loads.

A value that looks like a path (it starts with `.`, `/` or `~`, names something
that exists, or is no valid hub id) must be a checkpoint directory, i.e. hold a
`config.json`; anything else is a Hugging Face hub id, which must be in the local
hub cache or answer one quick request (no retries: transformers' loader retries a
missing network for half a minute before it fails). Each failure is one line that
names the value; a hub id that cannot be fetched also names `pixelprune
tiny-checkpoint`, the checkpoint that needs no network.

Imports no torch; huggingface_hub (installed with transformers) only for hub ids.
"""

from __future__ import annotations

import os
import re

HUB_TIMEOUT_S = 5.0  # the one request that asks the hub whether a model id can be fetched
OFFLINE_HINT = ("for a test checkpoint that needs no network, run `pixelprune tiny-checkpoint DIR` and give "
                "--model DIR (random weights: its answers mean nothing)")
# A hub id: NAME or OWNER/NAME, each 1..96 characters of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


class CheckpointNotFound(ValueError):
    """--model names no checkpoint: a path that is not a checkpoint directory, or an id the hub does
    not know (the command line is wrong)."""


class ModelUnavailable(OSError):
    """--model is a hub id that is neither in the local cache nor fetchable now (network, offline mode)."""


def looks_like_path(model: str) -> bool:
    """True when `model` can only mean a local path (see the module docstring)."""
    return (model.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(model))
            or not _HUB_ID.fullmatch(model) or "--" in model or ".." in model)


def check_model(model: str, cache_dir: str | None = None) -> str:
    """`model` when it can be loaded: a directory with config.json, or a hub id that is in the hub
    cache (`cache_dir`, None = the default) or answers one request. CheckpointNotFound or
    ModelUnavailable (one line) otherwise."""
    directory = os.path.expanduser(model)
    if os.path.isdir(directory):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise CheckpointNotFound(f"{model} is not a checkpoint (no config.json)")
        return model
    if looks_like_path(model):
        raise CheckpointNotFound(f"no such checkpoint directory: {model}")
    _check_hub_id(model, cache_dir)
    return model


def _check_hub_id(model: str, cache_dir: str | None) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model, "config.json", cache_dir=cache_dir), str):
        return
    if constants.is_offline_mode():
        raise ModelUnavailable(f"cannot fetch model {model}: it is not in the local Hugging Face cache and "
                               f"HF_HUB_OFFLINE is set; {OFFLINE_HINT}")
    try:
        get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise CheckpointNotFound(f"no model {model} on the Hugging Face hub (a private or gated one needs "
                                 f"HF_TOKEN); {OFFLINE_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - DNS, proxy, TLS, timeout, HTTP status: the one attempt failed
        detail = " ".join(str(exc).split()) or "no details"
        raise ModelUnavailable(f"cannot fetch model {model}: it is not in the local Hugging Face cache and "
                               f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {detail}); "
                               f"{OFFLINE_HINT}") from None
