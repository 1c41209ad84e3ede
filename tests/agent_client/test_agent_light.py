"""The client needs no model layer: `import agent_client` and every `pixelprune-agent` path load
no torch or transformers, the CLI grounds with them made unimportable, and the packages pip
installs for `.[client]` name neither, nor numba. (test_client_venv.py does the real install.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from agent_testlib import TOKEN

ROOT = Path(__file__).resolve().parents[2]
# (grpc_health and grpc_reflection are not here: grpcio's own __init__ imports them when installed)
HEAVY = ("torch", "transformers", "safetensors", "flash_attn", "redis", "prometheus_client", "service",
         "pixelprune.model", "pixelprune.selectors", "numba", "llvmlite")

# Runs argv through agent_client.cli.main with the model libraries unimportable (a None entry
# in sys.modules makes `import torch` raise ImportError, as in a venv without them), then
# prints which of HEAVY got loaded.
_PROBE = """
import json, sys
for name in ("torch", "transformers", "safetensors", "numba"):
    sys.modules[name] = None
import agent_client
from agent_client.cli import main
argv = json.loads(sys.argv[1])
code = 0
if argv:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
loaded = sorted(m for m in sys.modules if sys.modules[m] is not None
                and any(m == h or m.startswith(h + ".") for h in json.loads(sys.argv[2])))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def probe(*argv: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(argv)), json.dumps(HEAVY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


def test_import_and_help_load_no_model_layer():
    for argv in ((), ("--help",), ("ground", "--help"), ("live", "--help"), ("health", "--help")):
        report, out = probe(*argv)
        assert report == {"code": 0, "loaded": []}, argv
        assert argv == () or out.startswith("usage: pixelprune-agent")


def test_ground_runs_without_torch(pointing_server, token_file, screenshot, tmp_path):
    from PIL import Image

    path = tmp_path / "shot.png"
    Image.fromarray(screenshot).save(path)
    report, out = probe("ground", "--target", f"127.0.0.1:{pointing_server.port}", "--token-file",
                        str(token_file), str(path), "click the Save button", "--json")
    assert report == {"code": 0, "loaded": []}
    answer = json.loads(out)
    assert answer["raw_answer"] == "(642, 318)" and answer["keep_mask"]["rows"] == 22
    assert TOKEN not in out


def test_the_client_install_names_no_model_library():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["client"]
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
             for r in requirements}
    assert names == {"numpy", "pillow", "tqdm", "grpcio", "grpcio-health-checking", "protobuf", "mss"}
