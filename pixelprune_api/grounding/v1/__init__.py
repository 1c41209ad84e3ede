"""Generated gRPC code for pixelprune_api.grounding.v1 (from proto/; `python tools/gen_proto.py`)."""
