"""The committed generated code is what tools/gen_proto.py makes from the proto, byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["grounding_pb2.py", "grounding_pb2.pyi", "grounding_pb2_grpc.py"]


def test_generated_code_is_current(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / "pixelprune_api" / "grounding" / "v1" / name).read_bytes()
        committed = (ROOT / "pixelprune_api" / "grounding" / "v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run `python tools/gen_proto.py`"


def test_service_and_messages_are_as_documented():
    from pixelprune_api.grounding.v1 import grounding_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Grounding"]
    assert service.full_name == "pixelprune.grounding.v1.Grounding"
    ground, stream = service.methods_by_name["Ground"], service.methods_by_name["GroundStream"]
    assert (ground.input_type.name, ground.output_type.name) == ("GroundRequest", "GroundResponse")
    assert not ground.client_streaming and not ground.server_streaming
    assert (stream.input_type.name, stream.client_streaming, stream.server_streaming) == ("Frame", True, True)
