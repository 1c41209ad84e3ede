"""Seconds-long check before the long GPU run: `python -m benchmarks.gpu_preflight [--cpu-ok]`.

Prints one line per requirement and names everything missing, then exits 0 (all there) or 3:

1. Python and every distribution the service needs, with the bounds of pyproject.toml
   (`[project] dependencies` and the `service` extra, through the extras it names), and
   recursively the installed distributions' own requirements (e.g. the tokenizers and
   huggingface-hub versions a carried transformers wheel declares).
2. Imports that fail only at run time: transformers' Qwen3-VL module and vision hooks, the
   committed gRPC stubs (their generated-code checks need a grpcio and protobuf at least as
   new as the ones they were made with), the health and reflection services, and the modules
   the benchmark loads; then the tiny checkpoint written and loaded through the engine on
   the CPU (transformers' loading, tokenizer, processor: seconds).
3. torch with CUDA and a device; room: free device memory and free disk where the checkpoint
   is written.

Only the requirements of pyproject.toml, the imports and the loading stop the run; what the
installed distributions declare beyond that is reported as WARN lines.

flash-attn is optional (reported: with it the ViT runs flash attention).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRA = "service"  # the pyproject extra the benchmark needs (the server and the model)
MIN_DISK_BYTES = 12 * 1024 ** 3  # the 2B checkpoint in bf16 is ~4.3 GB; written once, read once
MIN_DEVICE_BYTES = 24 * 1024 ** 3  # model ~5 GB, activations of a 4K prefill, a KV pool, the graphs
NOT_FOLLOWED = {"torch"}  # its own requirements (CUDA runtime wheels, triton) vary by build; importing it checks it
IMPORTS = (  # (module, what it proves)
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "transformers has Qwen3-VL"),
    ("transformers.vision_utils", "transformers has the ViT's precomputed-kwargs hooks"),
    ("pixelprune_api.grounding.v1.grounding_pb2", "protobuf runs the committed message stubs"),
    ("pixelprune_api.grounding.v1.grounding_pb2_grpc", "grpcio runs the committed service stubs"),
    ("grpc_health.v1.health", "grpcio-health-checking"),
    ("grpc_reflection.v1alpha.reflection", "grpcio-reflection"),
    ("service.server", "the service loads"),
    ("pixelprune.model.engine", "the engine loads"),
    ("benchmarks.gpu_server", "the benchmark's server half loads"),
)


def pyproject_requirements(extra: str = EXTRA) -> tuple[str, list[str]]:
    """(requires-python, requirement strings of the core and `extra`, the extras it names expanded)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, out, todo, seen = project["optional-dependencies"], list(project["dependencies"]), [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in extras[name]:
            if line.startswith(project["name"] + "["):
                todo += line[len(project["name"]) + 1:-1].split(",")
            else:
                out.append(line)
    return project["requires-python"], out


def check_distributions(requirements: list[str], environment: dict | None = None) -> tuple[list[str], list[str]]:
    """(report lines, problems): each requirement (a problem when missing or out of bounds) and, recursively,
    what the installed distributions declare they need (a WARN line only: a package often imports and
    works without every declared dependency; `check_loading` is the proof)."""
    from packaging.requirements import Requirement

    lines, problems, seen = [], [], set()
    todo = [(Requirement(text), None) for text in requirements]
    while todo:
        req, needed_by = todo.pop(0)
        if req.marker is not None and not req.marker.evaluate({"extra": "", **(environment or {})}):
            continue
        key = (req.name.lower().replace("_", "-"), str(req.specifier))
        if key in seen:
            continue
        seen.add(key)
        try:
            version = md.version(req.name)
            wrong = None if not req.specifier or req.specifier.contains(version, prereleases=True) else \
                f"{req.name} {version} does not satisfy {req.specifier}"
        except md.PackageNotFoundError:
            version, wrong = None, f"{req.name}{req.specifier}: not installed"
        if wrong is not None:
            (problems.append(wrong) if needed_by is None else lines.append(f"WARN {wrong} (needed by {needed_by})"))
            continue
        if needed_by is None:
            lines.append(f"ok  {req.name} {version}" + (f" ({req.specifier})" if req.specifier else ""))
        if req.name.lower() not in NOT_FOLLOWED:
            todo += [(Requirement(text), req.name) for text in md.requires(req.name) or []]
    return lines, problems


def check_loading(workdir: Path) -> tuple[list[str], list[str]]:
    """(report lines, problems): the tiny checkpoint written and loaded through the service's loader on the
    CPU (from_pretrained, safetensors, tokenizer, chat template, processor): what the long run does first."""
    import time

    start = time.perf_counter()
    try:
        from pixelprune.model.engine import GroundingEngine, ModelSpec
        from pixelprune.model.request import BatchSettings
        from pixelprune.model.tiny import write_tiny_checkpoint

        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
            engine = GroundingEngine.load(ModelSpec(model=str(checkpoint), device="cpu"),
                                          batch=BatchSettings(max_batch_tokens=4096))
            engine.prompt_ids("the Save button")
    except Exception as exc:  # noqa: BLE001 - whatever fails here would fail the long run
        first = (str(exc).strip().splitlines() or [""])[0][:240]
        return [], [f"loading the tiny checkpoint through the engine: {type(exc).__name__}: {first}"]
    return [f"ok  the tiny checkpoint loads through the engine ({time.perf_counter() - start:.1f} s)"], []


def check_imports(modules=IMPORTS) -> tuple[list[str], list[str]]:
    """(report lines, problems): each module imported, or the one-line reason it cannot be."""
    lines, problems = [], []
    for module, what in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this reports
            first = (str(exc).strip().splitlines() or [""])[0][:240]
            problems.append(f"import {module} ({what}): {type(exc).__name__}: {first}")
            continue
        lines.append(f"ok  import {module}")
    return lines, problems


def check_device(cpu_ok: bool, workdir: Path) -> tuple[list[str], list[str]]:
    """(report lines, problems): torch's CUDA, the device's free memory, free disk in `workdir`."""
    lines, problems = [], []
    free_disk = shutil.disk_usage(workdir).free
    lines.append(f"disk: {free_disk / 1e9:.1f} GB free in {workdir}")
    if free_disk < MIN_DISK_BYTES:
        problems.append(f"only {free_disk / 1e9:.1f} GB free in {workdir}; the checkpoint needs "
                        f"{MIN_DISK_BYTES / 1e9:.0f} GB (set TMPDIR)")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return lines, problems + [f"import torch: {type(exc).__name__}: {exc}"]
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        if not cpu_ok:
            problems.append(f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)")
        return lines, problems
    free, total = torch.cuda.mem_get_info(0)
    lines.append(f"device: {torch.cuda.get_device_name(0)}, {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free")
    if free < MIN_DEVICE_BYTES:
        problems.append(f"only {free / 2 ** 30:.1f} GiB free on the device; the run needs "
                        f"{MIN_DEVICE_BYTES / 2 ** 30:.0f} GiB")
    try:
        import flash_attn
        lines.append(f"flash-attn {flash_attn.__version__}: the ViT runs flash attention")
    except ImportError:
        lines.append("flash-attn not installed (optional): every phase runs sdpa")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_preflight", description=__doc__.splitlines()[0])
    p.add_argument("--cpu-ok", action="store_true", help="do not require a CUDA device")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the checkpoint will be written (the temporary directory)")
    args = p.parse_args(argv)
    from packaging.specifiers import SpecifierSet

    python, requirements = pyproject_requirements()
    lines = [f"python {platform.python_version()} ({sys.executable})"]
    problems = [] if SpecifierSet(python).contains(platform.python_version()) else \
        [f"python {platform.python_version()} does not satisfy requires-python {python}"]
    for check in (lambda: check_distributions(requirements), check_imports, lambda: check_loading(args.workdir),
                  lambda: check_device(args.cpu_ok, args.workdir)):
        found, wrong = check()
        lines += found
        problems += wrong
    print("\n".join(lines))
    if problems:
        print(f"MISSING or WRONG ({len(problems)}):", *(f"  - {line}" for line in problems), sep="\n")
        return 3
    print("preflight: everything the benchmark needs is here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
