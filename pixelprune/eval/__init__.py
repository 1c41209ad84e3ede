"""`pixelprune eval`: click accuracy with and without pruning on ScreenSpot-format data.

One module per stage: `data` (annotation files -> samples), `runners` (a sample's answer,
in process through GroundingEngine or from a running service through GroundingClient),
`records` (scored predictions and the resumable JSONL file), `report` (per-category tables,
markdown, the accuracy-vs-retain chart) and `command` (the CLI that ties them together).
Only `runners` touches torch or grpc, and only when a runner is opened.
"""
