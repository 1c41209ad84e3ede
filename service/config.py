"""The service's configuration: flags of `pixelprune serve`, with `PIXELPRUNE_*` fallbacks.

This is the one place that reads the environment. Every option has a flag
(`--queue-size`) and an environment variable (`PIXELPRUNE_QUEUE_SIZE`); a flag
given on the command line wins over the environment, which wins over the
default. The result is a frozen `ServiceConfig` passed explicitly from there on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from pixelprune.cli_common import with_default
from pixelprune.model.request import BatchSettings, ModelSpec
from pixelprune.profiles import AUTO, get_profile
from pixelprune.settings import PruneSettings

MIB = 1024 * 1024
ENV_PREFIX = "PIXELPRUNE_"


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "0.0.0.0"  # address the gRPC and metrics servers bind
    port: int = 50051  # gRPC port (0 = any free port)
    metrics_port: int = 9464  # Prometheus /metrics port (0 = any free port, -1 = off)
    redis_url: str | None = None  # redis://host:port/db for sessions; None = in-process store
    redis_prefix: str = "pixelprune:session:"  # Redis key prefix of session entries
    max_image_pixels: int = 50_000_000  # largest screenshot accepted (width * height, pixels)
    max_message_bytes: int = 64 * MIB  # largest gRPC message received or sent (bytes)
    max_instruction_chars: int = 4096  # longest instruction accepted (characters)
    queue_size: int = 16  # requests waiting for the model worker before RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 256  # open RPCs (incl. streams) before gRPC refuses new ones
    session_ttl_s: float = 600.0  # a session is forgotten this many seconds after its last frame
    drain_grace_s: float = 30.0  # on SIGTERM, seconds in-flight requests get to finish
    auth_token_file: str | None = None  # file holding the bearer token; None = no auth
    tls_cert: str | None = None  # PEM certificate chain; with tls_key enables TLS
    tls_key: str | None = None  # PEM private key
    spec: ModelSpec = ModelSpec()  # the model: checkpoint, device, dtype, answer budget, profile
    batch: BatchSettings = BatchSettings()  # the engine's batch limits, KV pool and caches
    prune: PruneSettings = PruneSettings()  # default pruning (requests may override each field)
    log_level: str = "INFO"  # Python logging level name
    # --- admission, health and drain ---
    max_inflight_pixels: int = 50_000_000  # decoded pixels (width*height) of the images in flight, all RPCs together
    max_instruction_tokens: int = 512  # longest instruction accepted (tokens, special tokens counted as text)
    stream_idle_timeout_s: float = 60.0  # a stream with no frame for this long (nothing pending) is closed; 0 = never
    health_port: int = 0  # plaintext grpc.health.v1 server outside --max-concurrent-rpcs (0 = any free port, -1 = off)
    drain_delay_s: float = 5.0  # on SIGTERM: seconds of NOT_SERVING while still serving, before the drain grace
    admission_wait_s: float = 1.0  # how long a Ground call waits in line for room before RESOURCE_EXHAUSTED
    stall_timeout_s: float = 30.0  # work waiting with no progress this long: health NOT_SERVING until it resumes
    # --- streams that cannot take the server ---
    stream_first_frame_timeout_s: float = 5.0  # a stream with no first frame this long is closed; 0 = idle timeout
    max_open_streams: int = 192  # open streams of the server; < max_concurrent_rpcs, so unary calls keep slots
    max_streams_per_tenant: int = 64  # open streams of one tenant (with --auth-token-file); 0 = no limit
    max_streams_per_peer: int = 64  # open streams of one peer address (without auth); 0 = no limit

    def validate(self) -> "ServiceConfig":
        """Raise ValueError (one line) for a setting that cannot work; return self."""
        checks = [
            (bool(self.spec.model), "--model must not be empty"),
            (0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}"),
            (-1 <= self.metrics_port <= 65535, f"--metrics-port must be in -1..65535, got {self.metrics_port}"),
            (self.spec.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.spec.max_new_tokens}"),
            (self.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {self.max_image_pixels}"),
            (self.max_message_bytes >= 1024, f"--max-message-bytes must be >= 1024, got {self.max_message_bytes}"),
            (self.max_instruction_chars >= 1, "--max-instruction-chars must be >= 1"),
            (self.queue_size >= 1, f"--queue-size must be >= 1, got {self.queue_size}"),
            (self.max_concurrent_rpcs >= 1, "--max-concurrent-rpcs must be >= 1"),
            (self.session_ttl_s > 0 and math.isfinite(self.session_ttl_s), "--session-ttl-s must be > 0"),
            (self.drain_grace_s >= 0 and math.isfinite(self.drain_grace_s), "--drain-grace-s must be >= 0"),
            ((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together"),
            (self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
             f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"),
            (self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             "--redis-url must start with redis://, rediss:// or unix://"),
            (self.admission_wait_s >= 0 and math.isfinite(self.admission_wait_s), "--admission-wait-s must be >= 0"),
            (self.stall_timeout_s > 0 and math.isfinite(self.stall_timeout_s), "--stall-timeout-s must be > 0"),
        ]
        checks += self._hardening_checks()
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("auth_token_file", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")
        self.auth_tenants()  # a malformed token file is reported now, not after the model has loaded
        if self.spec.profile != AUTO:
            get_profile(self.spec.profile)  # an unknown name: one line, before any checkpoint is looked at
        return self

    def _hardening_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.max_inflight_pixels >= self.max_image_pixels,
             f"--max-inflight-pixels ({self.max_inflight_pixels}) must be >= --max-image-pixels "
             f"({self.max_image_pixels}), or the largest image allowed could never be admitted"),
            (self.max_instruction_tokens >= 1, "--max-instruction-tokens must be >= 1"),
            (self.stream_idle_timeout_s >= 0 and math.isfinite(self.stream_idle_timeout_s),
             "--stream-idle-timeout-s must be >= 0 (0 = never)"),
            (-1 <= self.health_port <= 65535, f"--health-port must be in -1..65535, got {self.health_port}"),
            (self.health_port <= 0 or self.health_port not in (self.port, self.metrics_port),
             f"--health-port {self.health_port} is already the gRPC or metrics port"),
            (self.drain_delay_s >= 0 and math.isfinite(self.drain_delay_s), "--drain-delay-s must be >= 0"),
            (self.stream_first_frame_timeout_s >= 0 and math.isfinite(self.stream_first_frame_timeout_s),
             "--stream-first-frame-timeout-s must be >= 0 (0 = the idle timeout applies)"),
            (1 <= self.max_open_streams < self.max_concurrent_rpcs,
             f"--max-open-streams ({self.max_open_streams}) must be >= 1 and below --max-concurrent-rpcs "
             f"({self.max_concurrent_rpcs}), so that streams never hold every slot unary calls need"),
            (self.max_streams_per_tenant >= 0, "--max-streams-per-tenant must be >= 0 (0 = no limit)"),
            (self.max_streams_per_peer >= 0, "--max-streams-per-peer must be >= 0 (0 = no limit)"),
        ]

    def auth_tenants(self) -> dict[str, str] | None:
        """token -> tenant from auth_token_file (format: `parse_token_file`), or None when auth is off."""
        if self.auth_token_file is None:
            return None
        with open(self.auth_token_file, encoding="utf-8") as f:
            return parse_token_file(f.read(), self.auth_token_file)


TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
COMMENT = re.compile(r"(^|\s)#.*")  # a token file comment: # at the start of a line or after a space


def bare_token_tenant(token: str) -> str:
    """The tenant of a file holding one bare token: named after a digest of the token, so servers
    with different tokens sharing one Redis keep their sessions apart, and replicas sharing a token
    share them."""
    return "token-" + hashlib.blake2b(token.encode(), digest_size=8, person=b"pixelprune-tnt").hexdigest()


def parse_token_file(text: str, path: str = "--auth-token-file") -> dict[str, str]:
    """token -> tenant. Either one bare token (the whole file; tenant `bare_token_tenant`), or one
    `TENANT TOKEN` pair per line. A `#` at the start of a line or after a space starts a comment
    (to the end of the line; a # inside a token is part of it); blank lines are ignored. A tenant
    may have several tokens (e.g. while rotating); a token belongs to one tenant. Errors name the
    file's line number."""
    entries = [(number, fields) for number, line in enumerate(text.splitlines(), start=1)
               if (fields := COMMENT.sub("", line).split())]
    if not entries:
        raise ValueError(f"--auth-token-file {path} is empty")
    if len(entries) == 1 and len(entries[0][1]) == 1:
        token = entries[0][1][0]
        return {token: bare_token_tenant(token)}
    tenants: dict[str, str] = {}
    for number, fields in entries:
        where = f"--auth-token-file {path} line {number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: must be `TENANT TOKEN` (then an optional # comment), got {len(fields)} "
                             f"field(s)")
        tenant, token = fields
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"{where}: tenant {tenant!r} must be 1..64 characters of [A-Za-z0-9._-]")
        if token in tenants:
            raise ValueError(f"{where}: a token is listed twice (tenants {tenants[token]!r} and {tenant!r})")
        tenants[token] = tenant
    return tenants


# Options whose flags set a field of a nested settings object: option -> (ServiceConfig field, its field,
# whether the flag is the field's negation, as --no-cuda-graphs is of cuda_graphs). Every other option is a
# ServiceConfig field of the same name.
_NESTED: dict[str, tuple[str, str, bool]] = {
    **{name: ("spec", name, False) for name in ("model", "device", "dtype", "max_new_tokens", "profile")},
    **{name: ("batch", name, False) for name in ("max_batch_size", "max_batch_tokens", "kv_cache_memory_fraction",
                                                 "max_prefill_tokens", "stop_after_point", "prefix_cache_bytes",
                                                 "vision_cache_size")},
    "no_cuda_graphs": ("batch", "cuda_graphs", True),
    "compile": ("batch", "compile", False),
    **{f"prune_{name}": ("prune", name, False) for name in ("method", "metric", "tau", "enabled")},
}


def _flip(value, negated: bool):
    """A nested option's value between the flag and the field (negation is its own inverse)."""
    return (not value) if negated else value


def option_names() -> set[str]:
    """Every option a flag can set, by field name (`configure`'s keywords)."""
    return (set(ServiceConfig.__dataclass_fields__) - {"spec", "batch", "prune"}) | set(_NESTED)


def option_default(option: str, config: "ServiceConfig | None" = None):
    """The value of one option (a flag's field name) in `config` (default: the defaults)."""
    config = ServiceConfig() if config is None else config
    if option not in _NESTED:
        return getattr(config, option)
    group, name, negated = _NESTED[option]
    return _flip(getattr(getattr(config, group), name), negated)


def configure(base: "ServiceConfig | None" = None, **options) -> "ServiceConfig":
    """A ServiceConfig from options by the flags' field names (`max_batch_tokens`, `prune_tau`, `model`, ...)
    over `base` (default: the defaults); not validated. ValueError naming the flag for a value a nested
    settings object refuses; TypeError for an unknown option."""
    base = ServiceConfig() if base is None else base
    top, nested = {}, {"spec": {}, "batch": {}, "prune": {}}
    for option, value in options.items():
        if option in _NESTED:
            group, name, negated = _NESTED[option]
            nested[group][name] = _flip(value, negated)
        elif option in ServiceConfig.__dataclass_fields__ and option not in nested:
            top[option] = value
        else:
            raise TypeError(f"unknown serve option {option!r}")
    for group, changes in nested.items():
        if changes:
            try:
                top[group] = dataclasses.replace(getattr(base, group), **changes)
            except ValueError as exc:
                raise ValueError(_flag_message(group, changes, str(exc))) from None
    return dataclasses.replace(base, **top)


def _flag_message(group: str, changes: dict, message: str) -> str:
    """A nested settings object's complaint with the flag's name: "max_batch_tokens must ..." ->
    "--max-batch-tokens must ..."; pruning's ("unknown pruning method ...") -> "--prune-method: ..."."""
    if group == "prune":
        name = next((n for n in ("method", "metric", "tau") if f"pruning {n}" in message or message.startswith(n)),
                    "method")
        return f"--prune-{name}: {message}"
    for name in changes:
        if message.startswith(name):
            flag = "--no-cuda-graphs" if name == "cuda_graphs" else "--" + name.replace("_", "-")
            return flag + message[len(name):]
    return message


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _path(text: str) -> str | None:
    return text or None


# (field, flag, parse, help). Flags map to PIXELPRUNE_<FLAG_IN_CAPS> in the environment.
_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("model", "--model", str, "hub id or local checkpoint directory"),
    ("device", "--device", str, "torch device: auto, cpu, cuda, cuda:1, ..."),
    ("dtype", "--dtype", str, "torch dtype: auto, bfloat16, float16, float32"),
    ("max_new_tokens", "--max-new-tokens", int, "tokens generated per answer"),
    ("host", "--host", str, "address to bind"),
    ("port", "--port", int, "gRPC port (0 = any free port)"),
    ("metrics_port", "--metrics-port", int, "Prometheus /metrics port (0 = any, -1 = off)"),
    ("redis_url", "--redis-url", _path, "Redis URL for sessions (absent = in-process store)"),
    ("redis_prefix", "--redis-prefix", str, "Redis key prefix of sessions"),
    ("max_image_pixels", "--max-image-pixels", int, "largest screenshot, width*height pixels"),
    ("max_message_bytes", "--max-message-bytes", int, "largest gRPC message, bytes"),
    ("max_instruction_chars", "--max-instruction-chars", int, "longest instruction, characters"),
    ("queue_size", "--queue-size", int, "requests waiting for the model before RESOURCE_EXHAUSTED"),
    ("max_concurrent_rpcs", "--max-concurrent-rpcs", int, "open RPCs incl. streams"),
    ("session_ttl_s", "--session-ttl-s", float, "session lifetime after its last frame, seconds"),
    ("vision_cache_size", "--vision-cache-size", int, "vision-encoder outputs kept (LRU entries)"),
    ("drain_grace_s", "--drain-grace-s", float, "seconds in-flight requests get on SIGTERM"),
    ("auth_token_file", "--auth-token-file", _path, "file with the bearer token (absent = no auth)"),
    ("tls_cert", "--tls-cert", _path, "PEM certificate chain (TLS with --tls-key)"),
    ("tls_key", "--tls-key", _path, "PEM private key"),
    ("prune_method", "--prune-method", str, "default method: raster, serpentine, pred2d"),
    ("prune_metric", "--prune-metric", str, "default metric: max, mae"),
    ("prune_tau", "--prune-tau", float, "default tau in [0, 1] (0 = lossless)"),
    ("log_level", "--log-level", str, "DEBUG, INFO, WARNING, ERROR"),
    ("max_batch_size", "--max-batch-size", int, "sequences decoded together"),
    ("max_batch_tokens", "--max-batch-tokens", int,
     "KV pool positions (rows x longest sequence); unset: from free device memory on CUDA, 32768 on CPU"),
    ("kv_cache_memory_fraction", "--kv-cache-memory-fraction", float,
     "CUDA without --max-batch-tokens: share of the free device memory the KV pool takes"),
    ("max_prefill_tokens", "--max-prefill-tokens", int, "prompt tokens prefilled per engine step"),
    ("prefix_cache_bytes", "--prefix-cache-bytes", int, "device bytes of cached prompt prefixes (0 = off)"),
    # --- admission, health and drain ---
    ("max_inflight_pixels", "--max-inflight-pixels", int,
     "decoded pixels of the images in flight across all RPCs (size from the pod's memory, see README)"),
    ("max_instruction_tokens", "--max-instruction-tokens", int, "longest instruction, tokens"),
    ("stream_idle_timeout_s", "--stream-idle-timeout-s", float,
     "close a stream that sends no frame, or leaves an answer unread, this long (0 = never)"),
    ("health_port", "--health-port", int, "plaintext health server outside the RPC limit (0 = any, -1 = off)"),
    ("drain_delay_s", "--drain-delay-s", float, "seconds of NOT_SERVING on SIGTERM before stopping the listener"),
    ("admission_wait_s", "--admission-wait-s", float,
     "seconds a Ground call waits in line for room (pixels, queue) before RESOURCE_EXHAUSTED"),
    ("stall_timeout_s", "--stall-timeout-s", float,
     "seconds of waiting work without progress before health turns NOT_SERVING"),
    ("profile", "--profile", str, "model family (prompt, resize, answer coordinates): auto (from the checkpoint's "
     "name and card), qwen3-vl, gui-owl, ui-venus, mai-ui, stepgui, holo2"),
    # --- streams that cannot take the server ---
    ("stream_first_frame_timeout_s", "--stream-first-frame-timeout-s", float,
     "close a stream that sends no first frame this long (0 = the idle timeout applies)"),
    ("max_open_streams", "--max-open-streams", int,
     "open streams at a time, below --max-concurrent-rpcs (more are refused: RESOURCE_EXHAUSTED)"),
    ("max_streams_per_tenant", "--max-streams-per-tenant", int, "open streams of one tenant (0 = no limit)"),
    ("max_streams_per_peer", "--max-streams-per-peer", int,
     "open streams of one peer address when auth is off (0 = no limit)"),
]
# On/off switches: (field, flag, help); PIXELPRUNE_<FLAG> takes true/false.
_SWITCHES: list[tuple[str, str, str]] = [
    ("no_cuda_graphs", "--no-cuda-graphs", "decode without CUDA graphs"),
    ("stop_after_point", "--stop-after-point", "end an answer once it holds a closed point"),
    ("compile", "--compile", "torch.compile the ViT's and the LLM's MLPs, dynamic shapes (--no-compile: eager; "
     "off until measured on a GPU)"),
]
_TOGGLES = ("compile",)  # switches that also take --no-<flag>


def env_name(flag: str) -> str:
    """--queue-size -> PIXELPRUNE_QUEUE_SIZE."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


# `pixelprune serve --help` in groups: title -> (description, fields of _OPTIONS, --no-prune and
# _SWITCHES, in the order shown). Every option is in exactly one group (a test checks); one that
# is in none is still offered, under OTHER_GROUP.
HELP_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": (
        f"the checkpoint, where it runs, how requests are pruned by default. --model is a checkpoint directory "
        f"or a Hugging Face hub id; the default, {ModelSpec.model}, is fetched from the hub once (then read "
        f"from its cache). With no network: `pixelprune tiny-checkpoint DIR` writes a test checkpoint (random "
        f"weights) to serve with --model DIR",
        ("model", "profile", "device", "dtype", "max_new_tokens", "stop_after_point",
         "prune_method", "prune_metric", "prune_tau", "no_prune")),
    "batching and caches": (
        "how the engine batches requests, how large its KV pool is, and what it keeps for the next request",
        ("max_batch_size", "max_batch_tokens", "kv_cache_memory_fraction", "max_prefill_tokens", "no_cuda_graphs",
         "compile", "prefix_cache_bytes", "vision_cache_size")),
    "limits and admission": (
        "what a request may be and how many may wait or run at once",
        ("max_image_pixels", "max_message_bytes", "max_instruction_chars", "max_instruction_tokens",
         "max_inflight_pixels", "queue_size", "admission_wait_s", "max_concurrent_rpcs", "max_open_streams",
         "max_streams_per_tenant", "max_streams_per_peer", "stream_first_frame_timeout_s", "stream_idle_timeout_s")),
    "sessions": (
        "where sessions (the previous frame's block hashes, the last answer) live",
        ("redis_url", "redis_prefix", "session_ttl_s")),
    "network and TLS": (
        "where the gRPC server listens and who may call it",
        ("host", "port", "tls_cert", "tls_key", "auth_token_file")),
    "health and drain": (
        "grpc.health.v1 and what SIGTERM does (check with `pixelprune-agent health --target HOST:PORT`)",
        ("health_port", "stall_timeout_s", "drain_delay_s", "drain_grace_s")),
    "metrics and logs": (
        "Prometheus /metrics and the log",
        ("metrics_port", "log_level")),
}
OTHER_GROUP = "other options"


def _argument_specs() -> dict[str, tuple[str, dict[str, Any]]]:
    """field -> (flag, add_argument keywords) of every serve option, in _OPTIONS / _SWITCHES order."""
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for field, flag, _parse, help_text in _OPTIONS:
        default = option_default(field)
        specs[field] = (flag, dict(dest=field, default=None, metavar=field.split("_")[-1].upper(),
                                   help=with_default(help_text, default, env_name(flag))))
    for field, flag, help_text in [("no_prune", "--no-prune", "run the model on every block by default")] + _SWITCHES:
        action = argparse.BooleanOptionalAction if field in _TOGGLES else "store_true"
        specs[field] = (flag, dict(dest=field, action=action, default=None,
                                   help=with_default(help_text, False, env_name(flag))))
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the serve flags in the groups of HELP_GROUPS; defaults stay None so the environment can fill them in."""
    specs = _argument_specs()
    for title, (description, fields) in HELP_GROUPS.items():
        group = parser.add_argument_group(title, description)
        for field in fields:
            if field in specs:
                flag, keywords = specs.pop(field)
                group.add_argument(flag, **keywords)
    if specs:  # in _OPTIONS but not yet in HELP_GROUPS
        group = parser.add_argument_group(OTHER_GROUP)
        for flag, keywords in specs.values():
            group.add_argument(flag, **keywords)


def from_namespace(args: argparse.Namespace, environ: Mapping[str, str]) -> ServiceConfig:
    """Flags (strings from argparse) over environment over defaults, parsed and validated."""
    values: dict[str, Any] = {}
    for field, flag, parse, _help in _OPTIONS:
        raw, source = getattr(args, field, None), flag
        if raw is None and env_name(flag) in environ:
            raw, source = environ[env_name(flag)], env_name(flag)
        if raw is None:
            continue
        try:
            values[field] = parse(raw)
        except ValueError:
            raise ValueError(f"{source}: cannot read {raw!r} as {getattr(parse, '__name__', 'value')}") from None
    no_prune = getattr(args, "no_prune", None)
    if no_prune is None and env_name("--no-prune") in environ:
        no_prune = _bool(environ[env_name("--no-prune")])
    if no_prune is not None:
        values["prune_enabled"] = not no_prune
    for field, flag, _help in _SWITCHES:
        switch = getattr(args, field, None)
        if switch is None and env_name(flag) in environ:
            switch = _bool(environ[env_name(flag)])
        if switch is not None:
            values[field] = switch
    return configure(**values).validate()


def from_args_and_env(argv: Sequence[str], environ: Mapping[str, str]) -> ServiceConfig:
    """Parse `pixelprune serve` arguments (without the subcommand) and the environment."""
    parser = argparse.ArgumentParser(prog="pixelprune serve")
    add_arguments(parser)
    return from_namespace(parser.parse_args(list(argv)), environ)
