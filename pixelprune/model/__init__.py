"""The model floor of PixelPrune: torch and transformers.

| module | owns |
| --- | --- |
| `adapter` | `PrunedQwen3VL`: the ViT on kept patches with full-grid positions, the pruned prefill |
| `positions` | keep masks, image grids, pruned token sequence with the full image's MRoPE positions |
| `processor` | the Qwen3-VL processor (also without torchvision) and its exact inverse |
| `pipeline` | screenshot -> resized uint8 -> keep mask -> kept `pixel_values` and token ids |
| `engine` | `GroundingEngine`: load, prepare, encode, ground; `sequence` / `step` / `output` for the loop |
| `scheduler` | torch-free: waiting and running sequences, rows, layout, budgets, stores' bookkeeping -> `StepPlan` |
| `step` | torch-free plain data between scheduler and runner: `Sequence`, `StepPlan`, `StepResult` |
| `loading` | device, dtype and attention choices when loading a checkpoint; random-weight detection |
| `compiled` | `--compile`: torch.compile of the ViT's and the LLM's MLPs, dynamic shapes |
| `runner` | the device: model, KV slots, stored prefixes and vision features, CUDA graphs; executes a `StepPlan` |
| `loop` | `EngineLoop`: one thread repeating schedule -> execute -> update; futures for the callers |
| `request` | `GroundRequest`, `GroundingOutput`, `BatchSettings` (what goes in and out of the engine) |
| `generation` | the extend forward (prefills), the decode step, its CUDA graphs |
| `attention` | the prefill attention per row over its own slot positions (`slot_attention`) |
| `kvcache` | `SlotKVCache`: preallocated per-layer pools, one slot per running sequence |
| `prefix` | cached prompt prefixes (`PrefixEntry`: the tensors; the scheduler keeps the bookkeeping) |
| `selectors_torch` | the selectors of `pixelprune.selectors` on torch uint8 tensors (any device) |
| `tiny` | a tiny random-weight Qwen3-VL checkpoint, dense or MoE, for tests (`pixelprune tiny-checkpoint`) |
| `rig` | the tiny checkpoint's weights set to answer one fixed text (`--answer`), any text |
| `checkpoint` | what `--model` names, checked before anything loads (directory with config.json, or hub id) |

Arrows point one way: this floor imports the core (`pixelprune.settings`, `geometry`,
`selectors`, `points`, `profiles`, ...); the core never imports this floor.
"""
