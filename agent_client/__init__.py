"""Client side of the PixelPrune grounding service: a typed gRPC client,
the `pixelprune-agent` CLI and a live desktop capture loop (mss)."""

from agent_client.client import GroundingClient, GroundingError, GroundResult

__all__ = ["GroundingClient", "GroundResult", "GroundingError"]
