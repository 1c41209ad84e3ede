"""The model floor of PixelPrune: torch and transformers.

| module | owns |
| --- | --- |
| `adapter` | `PrunedQwen3VL`: the ViT on kept patches with full-grid positions, the pruned prefill |
| `positions` | keep masks, image grids, pruned token sequence with the full image's MRoPE positions |
| `processor` | the Qwen3-VL processor (also without torchvision) and its exact inverse |
| `pipeline` | screenshot -> resized uint8 -> keep mask -> kept `pixel_values` and token ids |
| `engine` | `GroundingEngine`: load, prepare, encode, ground; admit / step / cancel for a model worker |
| `request` | `GroundRequest`, `GroundingOutput`, `BatchSettings` (what goes in and out of the batch) |
| `batching` | `BatchScheduler`: continuous batching (admit, step, cancel, limits, faults) |
| `sequence` | one request in the batch: planning, vision for cold requests, its output |
| `generation` | the extend forward (prefill and decode), the decode step, its CUDA graphs |
| `kvcache` | `SlotKVCache`: preallocated per-layer pools, one slot per running sequence |
| `prefix` | cached prompt prefixes (`PrefixEntry`) and the bounded LRU they live in |
| `selectors_torch` | the selectors of `pixelprune.selectors` on torch uint8 tensors (any device) |
| `tiny` | a tiny random-weight Qwen3-VL checkpoint, dense or MoE, for tests (`pixelprune tiny-checkpoint`) |
| `rig` | the tiny checkpoint's weights set to answer one fixed text (`--answer`), any text |

Arrows point one way: this floor imports the core (`pixelprune.settings`, `geometry`,
`selectors`, `points`, `profiles`, ...); the core never imports this floor.
"""
