"""The repository stands alone: nothing tracked reaches outside it for data or docs."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = "../" + "shared"  # spelt in two parts so that this file does not match itself


def test_no_tracked_file_refers_to_the_folder_beside_the_repository():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    offenders = []
    for name in filter(None, files.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:  # binary (images, npz)
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if OUTSIDE in line or "parents[2] / \"shared\"" in line:
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "tracked files refer to a folder outside the repository:\n" + "\n".join(offenders)


def test_the_test_corpus_is_in_the_repository():
    import json

    corpus = ROOT / "tests" / "data" / "corpus"
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert len(manifest) >= 5 and all((corpus / entry["file"]).is_file() for entry in manifest)
    assert (corpus / "reference" / "keep_indices.npz").is_file()
    size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024, f"the test corpus is {size} bytes; keep it under 5 MiB"
