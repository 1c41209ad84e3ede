"""Generated Python code of the gRPC contract in proto/ (proto package `pixelprune.grounding.v1`).

Kept apart from the `pixelprune` library so that its core never imports grpc; shared by
the service and the client. Regenerate with `python tools/gen_proto.py`, never by hand."""
