"""Client side of the PixelPrune grounding service: a typed gRPC client,
the `pixelprune-agent` CLI and a live desktop capture loop (mss).

    frames.py    image inputs -> the proto's Image (PNG level 1 or raw RGB)
    messages.py  pruning settings in; GroundResult (keep mask included), GroundingError out
    client.py    GroundingClient: the channel, retries, streams, health, status -> GroundingError
    capture.py   monitors, screen grabs, frame -> global coordinates, clicks
    cli.py       `pixelprune-agent ground`, `live` and `health`

Needs the `client` extra only (grpcio, grpcio-health-checking, protobuf, mss): never torch,
transformers or numba.
"""

from agent_client.client import GroundingClient
from agent_client.messages import GroundingError, GroundResult

__all__ = ["GroundingClient", "GroundResult", "GroundingError"]
