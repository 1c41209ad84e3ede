"""Generated gRPC code for pixelprune.grounding.v1 (from proto/; `python tools/gen_proto.py`)."""
