"""Generated protocol code of the grounding service."""
