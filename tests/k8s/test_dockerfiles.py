"""Static checks of Dockerfile, Dockerfile.cpu and .dockerignore.

No Docker engine runs here, so the images are checked by reading them: the
entrypoint is a real console script and subcommand, the exposed ports are the
service's defaults, every COPY source exists and survives .dockerignore, the
final image runs as a non-root user, torch comes from the right index.
"""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from k8s_tools import ROOT, dockerfile_instructions, dockerignore_excludes, dockerignore_patterns

DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def final_stage(instructions):
    """Instructions of the last build stage (from its FROM on)."""
    starts = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1]:]


def build_args(instructions) -> dict[str, str]:
    """ARG name -> default (the first default given in the file)."""
    args = {}
    for kw, text in instructions:
        if kw == "ARG" and "=" in text:
            name, _, value = text.partition("=")
            args.setdefault(name.strip(), value.strip().strip('"'))
    return args


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_is_pixelprune_serve(name):
    from pixelprune.cli import SUBCOMMANDS

    stage = final_stage(dockerfile_instructions(ROOT / name))
    entrypoints = [json.loads(text) for kw, text in stage if kw == "ENTRYPOINT"]
    assert entrypoints == [["pixelprune", "serve"]], "exec-form ENTRYPOINT, so SIGTERM reaches the server"
    assert "pixelprune" in PYPROJECT["project"]["scripts"]
    assert "serve" in SUBCOMMANDS and SUBCOMMANDS["serve"][0] == "service.cli"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_exposed_ports_are_service_defaults(name):
    from service.config import ServiceConfig

    stage = final_stage(dockerfile_instructions(ROOT / name))
    exposed = {int(p.split("/")[0]) for kw, text in stage if kw == "EXPOSE" for p in text.split()}
    defaults = ServiceConfig()
    assert exposed == {defaults.port, defaults.metrics_port}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_image_runs_as_numeric_non_root_user(name):
    stage = final_stage(dockerfile_instructions(ROOT / name))
    users = [text for kw, text in stage if kw == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    assert any(kw == "RUN" and f"--uid {uid}" in text for kw, text in stage), "the user is not created"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_and_are_not_ignored(name):
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    copies = [text for kw, text in dockerfile_instructions(ROOT / name) if kw in ("COPY", "ADD")]
    checked = 0
    for text in copies:
        words = text.split()
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY source {source} does not exist"
            if source != ".":
                assert not dockerignore_excludes(patterns, source), f"{name}: {source} is in .dockerignore"
            checked += 1
    assert checked >= 1


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], "pixelprune/cli.py", "service/config.py",
              "agent_client", "pixelprune/grounding/v1/grounding_pb2.py"]
    for path in needed:
        assert not dockerignore_excludes(patterns, path), f"{path} is needed by `pip install .`"
    for path in [".git/HEAD", "tests/conftest.py", "k8s/base/deployment.yaml", "benchmarks",
                 "pixelprune/__pycache__/cli.cpython-311.pyc", "pixelprune.egg-info/PKG-INFO"]:
        assert dockerignore_excludes(patterns, path), f"{path} should not reach the build context"


def test_dockerignore_matcher_follows_docker_rules():
    """The matcher the checks above rely on, on hand-worked cases."""
    patterns = ["tests", "**/*.py[cod]", "*.md", "!README.md", "docs/*/draft"]
    assert dockerignore_excludes(patterns, "tests/k8s/x.py")
    assert dockerignore_excludes(patterns, "a/b/c.pyc") and dockerignore_excludes(patterns, "c.pyo")
    assert not dockerignore_excludes(patterns, "a/b/c.py")
    assert dockerignore_excludes(patterns, "NOTES.md") and not dockerignore_excludes(patterns, "README.md")
    assert not dockerignore_excludes(patterns, "pkg/NOTES.md")  # `*` does not cross directories
    assert dockerignore_excludes(patterns, "docs/v1/draft/a.txt")
    assert not dockerignore_excludes(patterns, "mytests/a.py")


def _torch_pin_in_ci() -> str:
    match = re.search(r"torch==([0-9][0-9.]*)", (ROOT / ".ci" / "run").read_text())
    assert match, ".ci/run does not pin torch"
    return match.group(1)


def test_gpu_image_uses_cuda_runtime_and_matching_torch_build():
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    args = build_args(instructions)
    final_from = final_stage(instructions)[0][1]
    assert final_from.startswith("nvidia/cuda:") and "runtime" in final_from
    assert args["TORCH_VERSION"] == _torch_pin_in_ci()
    cuda_major = args["CUDA_TAG"].split(".")[0]
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX"])
    assert index and index.group(1).startswith(cuda_major), "torch's CUDA build must match the base image's CUDA"
    run_text = " ".join(text for kw, text in instructions if kw == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in run_text
    assert "pip install \"/src[service]\"" in run_text


def test_gpu_image_flash_attn_is_an_opt_in_build_stage():
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    args = build_args(instructions)
    assert args["FLASH_ATTN"] == "0"
    stages = {text.split(" AS ")[-1] for kw, text in instructions if kw == "FROM" and " AS " in text}
    assert {"flash-attn-0", "flash-attn-1", "flash-attn-wheels"} <= stages
    assert ("FROM", "flash-attn-${FLASH_ATTN} AS flash-attn-wheels") in instructions
    flash_stage = instructions[instructions.index(next(i for i in instructions if i[1].endswith("AS flash-attn-1"))):]
    assert "devel" in flash_stage[0][1], "flash-attn compiles with nvcc: build it in a devel image"
    assert any(kw == "COPY" and "--from=flash-attn-wheels" in text for kw, text in final_stage(instructions))
    assert any("flash-attn" in dep for dep in PYPROJECT["project"]["optional-dependencies"]["gpu"])


def test_cpu_image_uses_cpu_torch_and_ships_the_tiny_checkpoint():
    instructions = dockerfile_instructions(ROOT / "Dockerfile.cpu")
    args = build_args(instructions)
    base = instructions[0]
    assert base[0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base[1])
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert args["TORCH_VERSION"] == _torch_pin_in_ci()
    runs = [text for kw, text in instructions if kw == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu' in r for r in runs)
    tiny = [re.search(r"pixelprune tiny-checkpoint (\S+)", r) for r in runs]
    tiny_dirs = [m.group(1) for m in tiny if m]
    assert len(tiny_dirs) == 1
    env_text = " ".join(text for kw, text in instructions if kw == "ENV")
    assert f"PIXELPRUNE_MODEL={tiny_dirs[0]}" in env_text and "PIXELPRUNE_DEVICE=cpu" in env_text
    # The checkpoint is written after USER, so the non-root server owns it.
    kinds = [kw for kw, _ in instructions]
    tiny_at = next(i for i, (kw, text) in enumerate(instructions) if kw == "RUN" and "tiny-checkpoint" in text)
    assert "USER" in kinds[:tiny_at]
