"""Batched greedy generation with a KV cache: one prefill of every prompt, then one decode step per
new token, for any model with the shared interface (setup_cache, next_tokens; see ncl.models.llama).

Every rank of a tensor-parallel group runs the same calls with the same tokens (the greedy tokens
come out identical on every rank, as ParallelLMHead.argmax all-reduces them)."""
import time
from typing import Callable, Optional, Sequence, Union

import torch


PREFILL_CHUNK_TOKENS = 1024  # tokens (over the whole batch) per prefill pass: bounds the activations


def prefill_chunk(batch: int, length: int, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """Prompt positions per prefill pass for `batch` sequences of `length`."""
    return max(1, min(length, chunk_tokens // max(1, batch)))


class Generator:
    def __init__(self, model, *, max_batch: int, max_seq: int, chunk_tokens: int = PREFILL_CHUNK_TOKENS):
        if max_batch < 1 or max_seq < 1 or chunk_tokens < 1:
            raise ValueError(f"max_batch, max_seq and chunk_tokens must be >= 1, not {max_batch}, {max_seq} "
                             f"and {chunk_tokens}")
        self.model, self.max_batch, self.max_seq, self.chunk_tokens = model, max_batch, max_seq, chunk_tokens
        model.setup_cache(max_batch, max_seq)
        self.pos = 0  # positions held in the cache (the same for every sequence)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], every sequence from position 0 -> the next token of each [B]; fills the cache.
        Long prompts go through in chunks of about chunk_tokens tokens (chunked prefill, as serving
        engines do): each chunk attends to the cache the earlier ones filled, so the activations
        stay those of one chunk."""
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prompts must be [batch, length >= 1], not {tuple(tokens.shape)}")
        self._check(tokens.shape[0], tokens.shape[1], start=0)
        step = prefill_chunk(tokens.shape[0], tokens.shape[1], self.chunk_tokens)
        for start in range(0, tokens.shape[1], step):
            out = self.model.next_tokens(tokens[:, start:start + step], start)
        self.pos = tokens.shape[1]
        return out

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B], one per sequence -> the next one [B]."""
        if tokens.dim() != 1:
            raise ValueError(f"decode takes one token per sequence [batch], not {tuple(tokens.shape)}")
        if self.pos == 0:
            raise ValueError("decode comes after prefill")
        self._check(tokens.shape[0], 1, start=self.pos)
        out = self.model.next_tokens(tokens[:, None], self.pos)
        self.pos += 1
        return out

    def _check(self, batch: int, length: int, start: int) -> None:
        if batch > self.max_batch or start + length > self.max_seq:
            raise ValueError(f"{batch} sequences up to position {start + length} exceed the generator's "
                             f"max_batch {self.max_batch} / max_seq {self.max_seq}")

    def generate(self, prompts: Union[torch.Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
                 on_step: Optional[Callable[[int, float], None]] = None) -> torch.Tensor:
        """Greedy continuation of prompts (equal lengths) -> [B, max_new_tokens].  on_step(step, seconds)
        after every step: step 0 is the prefill (its time is the time to first token), then the decodes."""
        prompts = prompts if isinstance(prompts, torch.Tensor) else torch.tensor(prompts, dtype=torch.long)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be [batch, length] of equal lengths, not {tuple(prompts.shape)}")
        self._check(prompts.shape[0], prompts.shape[1] + max_new_tokens - 1, start=0)
        out = torch.empty(prompts.shape[0], max_new_tokens, dtype=torch.long)
        t0 = time.perf_counter()
        out[:, 0] = self.prefill(prompts)
        if on_step:
            on_step(0, time.perf_counter() - t0)
        for step in range(1, max_new_tokens):
            t0 = time.perf_counter()
            out[:, step] = self.decode(out[:, step - 1])
            if on_step:
                on_step(step, time.perf_counter() - t0)
        return out
