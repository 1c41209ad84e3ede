"""The model floor of PixelPrune: torch and transformers.

| module | owns |
| --- | --- |
| `adapter` | `PrunedQwen3VL`: the ViT on kept patches with full-grid positions, the pruned prefill |
| `positions` | keep masks, image grids, pruned token sequence with the full image's MRoPE positions |
| `processor` | the Qwen3-VL processor (also without torchvision) and its exact inverse |
| `pipeline` | screenshot -> resized uint8 -> keep mask -> kept `pixel_values` and token ids |
| `engine` | `GroundingEngine`: load, prepare, encode, ground (what the service runs) |
| `selectors_torch` | the selectors of `pixelprune.selectors` on torch uint8 tensors (any device) |
| `tiny` | a tiny random-weight Qwen3-VL checkpoint for tests (`pixelprune tiny-checkpoint`) |

Arrows point one way: this floor imports the core (`pixelprune.settings`, `geometry`,
`selectors`, `points`, ...); the core never imports this floor.
"""
