"""What goes into the engine (`GroundRequest`), what comes out (`GroundingOutput`), which model it runs
(`ModelSpec`) and the limits of its batch (`BatchSettings`). No torch: the service's configuration
nests the last two."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:  # annotations only: this module loads without torch (the service imports it)
    from pixelprune.model.adapter import VisionFeatures
    from pixelprune.model.pipeline import PreparedImage

from pixelprune.profiles import AUTO

GIB = 1024 ** 3
CPU_KV_TOKENS = 32768  # KV pool positions on a CPU device when max_batch_tokens is not given


@dataclass(frozen=True)
class ModelSpec:
    model: str = "Qwen/Qwen3-VL-2B-Instruct"  # hub id or local checkpoint directory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16"
    attn_implementation: str | None = None  # None: flash_attention_2 on CUDA when installed, else sdpa
    max_new_tokens: int = 24  # generation budget per answer (greedy)
    profile: str = AUTO  # model profile (pixelprune.profiles) name, or "auto": from the checkpoint's name


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32  # sequences decoded together (rows of the batch)
    max_batch_tokens: int | None = None  # KV pool positions (rows x slot length, the slot being the longest
    #                                      running prompt + its new tokens rounded up to a length bucket);
    #                                      None: on CUDA sized from free memory, CPU_KV_TOKENS on a CPU
    kv_cache_memory_fraction: float = 0.5  # on CUDA without max_batch_tokens: share of the free device memory
    #                                        (after the model, a warm-up and the prefix cache) the pool takes
    max_prefill_tokens: int = 8192  # prompt tokens prefilled in one step (a step's first prompt may exceed it)
    cuda_graphs: bool = True  # on CUDA, replay the decode step from CUDA graphs (ignored on CPU)
    compile: bool = False  # torch.compile the ViT's and the LLM's MLPs, dynamic shapes (pixelprune.model.compiled)
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" traces only: tests)
    stop_after_point: bool = False  # finish an answer as soon as its text holds a closed point
    prefix_cache_bytes: int = GIB  # device bytes of cached prompt prefixes (keys/values), LRU; 0 = off
    vision_cache_size: int = 32  # vision-encoder outputs kept per cache key (entries, LRU); 0 = off

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 256:
            raise ValueError(f"max_batch_tokens must be >= 256, got {self.max_batch_tokens}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.vision_cache_size < 0:
            raise ValueError(f"vision_cache_size must be >= 0, got {self.vision_cache_size}")


@dataclass(frozen=True)
class GroundRequest:
    prepared: PreparedImage  # the screenshot: resized, selected, patchified
    instruction: str  # what to find
    prompt: str | None = None  # template containing {instruction}; None = DEFAULT_GROUNDING_PROMPT
    max_new_tokens: int | None = None  # generation budget; None = the engine's
    cache_key: Hashable | None = None  # identity of (tenant, frame content, pruning, resized size) for
    #                                     prefix and vision reuse; None = no reuse
    vision: VisionFeatures | None = None  # vision features of these pixels and keep mask (skips the ViT)


@dataclass(frozen=True)
class GroundingOutput:
    raw_text: str  # the model's answer, special tokens removed
    point: tuple[float, float] | None  # click point in pixels of the ORIGINAL screenshot, or None
    point_normalized: tuple[float, float] | None  # the same point in 0..1 of width/height, or None
    kept_blocks: int  # visual tokens the model saw
    total_blocks: int  # visual tokens of the full resized image
    retain_ratio: float  # kept_blocks / total_blocks
    kv_cache_bytes: int  # key+value bytes of the prompt's KV cache (after prefill)
    vision: VisionFeatures | None  # the vision features used (pass back as vision=); None when a cached
    #                                prefix made them unnecessary and none were kept
    timings: dict  # seconds: resize, select, patchify, vit, prefill, decode_tokens, ttft
    vision_reused: bool  # the ViT did not run (features given or cached, or a cached prefix)
    generated_tokens: int  # tokens generated, including the first (and an end-of-turn token)
    prefix_reused: bool = False  # the prompt prefix's keys/values came from the prefix cache
    answer_logprob: float = 0.0  # sum of the natural-log probabilities of the generated tokens (a confidence)
