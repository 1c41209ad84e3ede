"""`pixelprune eval` as a process: it starts without torch, and Ctrl-C writes what is done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from eval_testlib import SCREENSPOT, markdown_rows, read_jsonl
from pixelprune.cli import main

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["pixelprune.eval", "pixelprune.eval.data", "pixelprune.eval.records", "pixelprune.eval.report",
           "pixelprune.eval.runners", "pixelprune.eval.command"]


def python(code_or_args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, *code_or_args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_eval_modules_and_command_load_no_torch_grpc_or_matplotlib(tmp_path):
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            "from pixelprune.cli import main\n"
            f"rc = main(['eval', {str(tmp_path / 'none')!r}, '--model', 'x'])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'grpc', 'matplotlib') if m in sys.modules))\n")
    proc = python(["-c", code])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split("\n")[0] == "2 []"  # the bad DATA is reported before any model layer is imported
    assert err.strip() == f"pixelprune eval: error: {tmp_path / 'none'}: no such file or directory"


def test_ctrl_c_writes_what_is_done_and_a_rerun_finishes(screenspot_dir, rigged_server, eval_token_file, tmp_path,
                                                        capsys):
    """Against the test server, so the child process starts without torch (seconds, not tens)."""
    entries = json.loads((screenspot_dir / "screenspot_web_v2.json").read_text())
    many = tmp_path / "screenspot_web_v2.json"  # 15 samples x 2 settings: a second or more of work
    many.write_text(json.dumps([{**entries[i % len(entries)], "img_filename": str(screenspot_dir / "imgs" / Path(
        entries[i % len(entries)]["img_filename"]).name)} for i in range(15)]))
    md, jsonl = tmp_path / "eval.md", tmp_path / "eval.jsonl"
    args = ["eval", str(many), "--target", f"127.0.0.1:{rigged_server.port}", "--token-file", str(eval_token_file),
            "--jsonl", str(jsonl), "--markdown", str(md), "--settings", "full,pred2d:max:0"]
    # SIGINT must reach Python's handler even if this test runs in a background job (SIG_IGN inherited)
    proc = python(["-m", "pixelprune.cli", *args], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done = len(read_jsonl(jsonl))
    assert 1 <= done < 30
    assert f"interrupted: {done} of 30 answers" in out and f"interrupted: {done} of 30 answers" in md.read_text()
    assert sum(int(cells[0]) for (category, _), cells in markdown_rows(md.read_text()).items()
               if category == "all") == done

    assert main(args) == 0  # the rerun resumes and completes
    assert f"resuming: {done} of 30 answers already in" in capsys.readouterr().err
    lines = read_jsonl(jsonl)
    assert len(lines) == 30 and len({(r["sample_id"], r["setting"]) for r in lines}) == 30
    hits = sum(kind in ("hit", "edge") for _, _, kind in SCREENSPOT["screenspot_web_v2.json"])  # per 5 samples
    assert markdown_rows(md.read_text())[("all", "full")][:2] == ["15", str(3 * hits)]
