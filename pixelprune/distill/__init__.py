"""`pixelprune distill`: self-distillation so that pruning stops costing grounding accuracy.

The student (the base's weights, trained) sees only the blocks a `PruneSettings` keeps, with
the full image's positions; the teacher (the same starting weights, frozen) sees every block.

| module | owns |
| --- | --- |
| `data` | annotation files (ScreenSpot-v2, ScreenSpot-Pro, OS-Atlas, ShareGPT) -> `DistillSample`s, bad rows |
| `split` | screenshot digests, the held-out split by screenshot, the overlap refusal |
| `prepare` | everything checked before a model loads; the data part of the provenance |
| `batch` | samples -> left-padded batches: the teacher's full sequence, the student's keep masks |
| `model` | `DistillModel`: teacher and pruned student answer logits in one forward; the KL and its gradient |
| `trainer` | `DistillTrainer` (transformers.Trainer): loss per answer token, checkpoints, progress, Ctrl-C |
| `train` | loading, the LoRA or full student, TrainingArguments, the exported checkpoint |
| `labels` | greedy answers: the teacher's (`--labels teacher`, held-out) and the pruned student's |
| `heldout` | KL, top-1 agreement and click accuracy on the held-out part |
| `report` | the provenance record, the end-of-run table, the exported README |
| `run`, `command`, `plan` | the phases of one run; the command line |

Model floor: imports torch, transformers, accelerate and (for LoRA) peft; imported only when
`pixelprune distill` runs.
"""
