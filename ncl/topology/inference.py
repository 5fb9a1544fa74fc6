"""What one engine step of a sharded model costs on a server: operators on the chip, collectives on the links.

A step runs `tokens` new tokens of `sequences` sequences through every layer (prefill chunks and decode
tokens alike) and ends in one greedy token per sequence.  Per rank and layer the operators are the
matmuls (FLOPs 2 x tokens x weights; bytes: the weights in their storage precision plus activations),
attention (FLOPs 4 x heads x head_dim x keys attended; bytes: the KV cache read and written; the decodes'
attention and the prompt chunks' are separate kernels, as in TensorRT-LLM's generation and context
attention and vLLM's decode and prefill paths, so the one's memory traffic never hides the other's
FLOPs, while a matmul over decode and prompt rows together reads its weights once), the MoE
router and the experts a step touches under balanced routing, and the norms and elementwise work; then
the embedding and the LM head (last position of each sequence).  Each operator costs
max(FLOPs / achievable compute, bytes / achievable bandwidth) + the chip's fixed cost (chip.py).  The
collectives are arch.forward_collectives, priced by the topology's link model; with `overlap` a step
takes max(compute, communication), else their sum.  Everything is numpy-vectorised over the keys
attended, so a whole decode (one step per output token) is one call.

With `pp` pipeline stages a copy of the model spans tp x pp chips: each chip holds ceil(layers / pp) layers
(the slowest stage's: it also runs the LM head) and the KV cache of every running sequence in them, and a
step of all sequences is pp stage-times, each one micro-batch (1/pp of the tokens) through one stage: the
weights are read once per micro-batch, and the activations a stage hands to the next travel while it
computes the next micro-batch (only what they take beyond its compute shows).

The floor of a step (`floor`) uses peak rates, no fixed costs and only the bytes no schedule can avoid:
per chip the weights and KV cache it must read once and the FLOPs it must do, plus each collective's
bytes over the chip's own links at line rate.  No prediction is faster.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from ..collectives import SENDS_TOTAL
from .arch import Arch, Collective, Split, forward_collectives
from .chip import WEIGHT_BYTES, ChipType
from .core import uniform_matrix

ACT_BYTES = 2                 # activations in bf16
EMBED_PRECISION = "bf16"      # embedding, LM head, router and norms stay bf16 in FP8/MXFP4 checkpoints
# as serving stacks keep the weights and the KV cache: vLLM's default gpu_memory_utilization is 0.9
# (https://docs.vllm.ai/en/latest/configuration/engine_args.html)
MEMORY_UTILIZATION = 0.9
STEP_TOKENS = 8192            # the largest step (vLLM's token budget), whose temporaries memory must hold
ELEMENTWISE_PASSES = 10       # norms, rotary, activation and residual adds: passes over a token's hidden state
KERNELS_PER_LAYER = {"dense": 8, "moe": 10}   # qkv, attention, o, gate-up, down, 2 norms, activation (+ router, combine)


def attention_precision(precision: str) -> str:
    """4-bit checkpoints keep attention in bf16 (gpt-oss ships it so); others quantize it too."""
    return "bf16" if precision in ("mxfp4", "int4") else precision


@dataclass
class Keys:
    """Keys attended and KV entries read in one step, per layer kind, summed over the step's tokens
    (attended) and sequences (read).  Arrays broadcast: one element per step of a sweep."""
    attended_full: np.ndarray
    attended_window: np.ndarray
    read_full: np.ndarray
    read_window: np.ndarray

    @classmethod
    def decode(cls, contexts, window: int) -> "Keys":
        """One new token per sequence; contexts: keys each sequence holds (the new one included),
        an array [steps, sequences] or [sequences]."""
        c = np.asarray(contexts, dtype=np.float64)
        w = np.minimum(c, window) if window else c
        return cls(c.sum(-1), w.sum(-1), c.sum(-1), w.sum(-1))

    @classmethod
    def prefill(cls, new, cached, window: int) -> "Keys":
        """Chunks of `new` positions after `cached` ones (arrays of chunks; summed)."""
        n, c = np.asarray(new, dtype=np.float64), np.asarray(cached, dtype=np.float64)
        full = n * c + n * (n + 1) / 2
        if window:  # position c + i attends to min(c + i, window) keys
            upto = np.clip(window - c, 0, n)               # the first positions still see their whole past
            inside = upto * c + upto * (upto + 1) / 2
            windowed = inside + (n - upto) * window
            read_w = np.minimum(c + n, n + window - 1)
        else:
            windowed, read_w = full, c + n
        return cls(full.sum(-1), windowed.sum(-1), (c + n).sum(-1), read_w.sum(-1))

    def __add__(self, other: "Keys") -> "Keys":
        return Keys(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def attention_kernels(keys) -> Tuple[Keys, ...]:
    """A step's attention kernels: one Keys (decodes, or prompt chunks, alone) or a tuple of them."""
    return keys if isinstance(keys, tuple) else (keys,)


def total_keys(keys) -> Keys:
    parts = attention_kernels(keys)
    return sum(parts[1:], parts[0])


def pipeline_stage(arch: Arch, pp: int) -> Arch:
    """The layers one of pp pipeline stages holds: the largest share, sliding-window layers pro rata."""
    if pp == 1:
        return arch
    layers = -(-arch.n_layers // pp)
    return dataclasses.replace(arch, n_layers=layers, sliding_layers=round(arch.sliding_layers * layers / arch.n_layers))


@dataclass
class StepCost:
    compute: np.ndarray       # seconds in operators bound by compute
    memory: np.ndarray        # seconds in operators bound by memory traffic
    overhead: np.ndarray      # fixed costs of the operators
    comm: float               # seconds in collectives
    overlap: bool

    @property
    def chip(self):
        return self.compute + self.memory + self.overhead

    @property
    def seconds(self):
        return np.maximum(self.chip, self.comm) if self.overlap else self.chip + self.comm


class Server:
    """A model split over the first ranks of a topology, at a precision.

    >>> s = Server(load_topology("pcie-gen5-8card"), Arch.of(get_config("llama-3.1-405b")), Split(8), "bf16")
    >>> s.step(tokens=1, sequences=1, keys=Keys.decode([129], 0)).seconds
    """

    def __init__(self, topology, arch: Arch, split: Split, precision: str = "bf16",
                 kv_precision: Optional[str] = None, overlap: bool = False, compress: Optional[str] = None,
                 pp: int = 1):
        why = split.problem(arch)
        if why:
            raise ValueError(f"{arch.name}: {why}")
        if not (type(pp) is int and 1 <= pp <= arch.n_layers):
            raise ValueError(f"pp must be an integer from 1 to the {arch.n_layers} layers of {arch.name}, not {pp!r}")
        if precision not in WEIGHT_BYTES:
            raise ValueError(f"precision must be one of {', '.join(WEIGHT_BYTES)}, not {precision!r}")
        kv_precision = kv_precision or ("fp8" if precision == "fp8" else "bf16")
        if kv_precision not in ("bf16", "fp16", "fp8"):
            raise ValueError(f"kv_precision must be bf16, fp16 or fp8, not {kv_precision!r}")
        if compress is not None:
            from ..compress import check_format
            check_format(compress)
        self.pp, self.model = pp, arch  # model: the whole model; self.arch (below): the stage one chip holds
        arch = pipeline_stage(arch, pp)  # what one chip holds and runs: everything below prices that
        self.arch, self.split, self.precision, self.kv_precision, self.overlap = arch, split, precision, kv_precision, overlap
        self.compress = compress  # the activations' all-reduces block-scaled (ncl.compress), or None
        self.nranks = split.world(arch) * pp
        self.topology = topology.scaled(self.nranks) if self.nranks > topology.num_chips else topology
        chip = next(c for c in self.topology.spec.chips if c.name == self.topology.spec.placement[0])
        if chip.type is None or not chip.type.compute_tflops:
            raise ValueError(f"topology {topology.name!r}: chip {chip.name!r} has no chip type with compute rates "
                             "(chip_types in the file)")
        self.chip: ChipType = chip.type
        self.chip.compute_precision(precision)  # a clear error now if the chip cannot run it
        self._priced: Dict[Tuple[str, int, int], float] = {}
        self._comm: Dict[Tuple[int, int], float] = {}
        self._link_j: Optional[float] = None
        self._handoff: Optional[Tuple[float, float]] = None
        self._one_two = [dataclasses.replace(arch, n_layers=n, sliding_layers=0) for n in (1, 2)]
        self.links_gbps = self._injection_gbps(chip.name)

    # ---- memory ------------------------------------------------------------------------------------------
    def weight_bytes(self) -> float:
        """Weights on the largest rank."""
        a, s = self.arch, self.split
        we = WEIGHT_BYTES[EMBED_PRECISION]
        attn, mlp = self.layer_params()
        layer = attn * WEIGHT_BYTES[attention_precision(self.precision)] + mlp * WEIGHT_BYTES[self.precision]
        if a.moe:  # expert biases, and the router (replicated)
            layer += a.num_experts // s.ep * (2 * a.ffn_dim + a.dim) * we + a.dim * a.num_experts * we
        tables = (1 if a.tied or self.pp > 1 else 2) * math.ceil(a.vocab / s.tp) * a.dim * we  # pp: first or last stage
        return a.n_layers * (layer + 2 * a.dim * we) + tables

    def layer_params(self) -> Tuple[float, float]:
        """(attention matmul, MLP or local experts' matmul) parameters of one layer on one rank."""
        a, s = self.arch, self.split
        hl, kvl = s.heads(a)
        attn = 2 * a.dim * hl * a.head_dim + 2 * a.dim * kvl * a.head_dim
        if a.moe:
            return attn, a.num_experts // s.ep * 3 * a.dim * a.ffn_dim
        return attn, 3 * a.dim * (a.ffn_dim // s.tp)

    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one position of one sequence takes on a rank, in every layer (sliding-window
        layers keep at most the window, counted here as full positions: the bound for short contexts)."""
        _, kvl = self.split.heads(self.arch)
        return 2 * kvl * self.arch.head_dim * WEIGHT_BYTES[self.kv_precision] * self.arch.n_layers

    def kv_bytes(self, sequences: int, context: float) -> float:
        """KV cache of `sequences` sequences of `context` positions on one rank (a MoE rank holds its
        data-parallel group's share)."""
        a = self.arch
        _, kvl = self.split.heads(a)
        per = 2 * kvl * a.head_dim * WEIGHT_BYTES[self.kv_precision]
        window = min(context, a.sliding_window) if a.sliding_window else context
        local = sequences / self.split.dp(a)
        return per * local * (a.full_layers * context + a.sliding_layers * window)

    def activation_bytes(self, tokens: int = STEP_TOKENS) -> float:
        """The largest step's temporaries on a rank: the hidden state and its copies (residual, normed,
        attention output), q/k/v and the MLP's gate and up projections of `tokens` tokens."""
        a, s = self.arch, self.split
        hl, kvl = s.heads(a)
        per_token = 4 * a.dim + (hl + 2 * kvl) * a.head_dim + 2 * (a.ffn_dim if a.moe else a.ffn_dim // s.tp)
        return tokens / s.dp(a) * per_token * ACT_BYTES

    def memory_budget(self) -> float:
        """Bytes for weights and KV cache: the serving stack's share of memory less a step's temporaries."""
        return self.chip.memory_bytes * MEMORY_UTILIZATION - self.activation_bytes()

    def fits(self, sequences: int, context: float) -> bool:
        return self.weight_bytes() + self.kv_bytes(sequences, context) <= self.memory_budget()

    def max_sequences(self, context: float) -> int:
        """The largest batch whose weights and KV cache of `context` positions fit (0: not even one)."""
        free = self.memory_budget() - self.weight_bytes()
        one = self.kv_bytes(1, context)
        if free <= 0 or one <= 0:
            return 0
        dp = self.split.dp(self.arch)
        return int(free // one) // dp * dp  # whole sequences on every data-parallel group

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, tokens, sequences, keys) -> StepCost:
        """The cost of one step: `tokens` new tokens of `sequences` sequences (scalars, or arrays of steps);
        `keys`: a Keys, or a tuple of them priced as separate attention kernels (decodes, prompt chunks)."""
        if self.pp == 1:
            return self._stage_step(tokens, sequences, keys)
        pp = self.pp  # pp stage-times of one micro-batch each
        micro = np.ceil(np.asarray(tokens) / pp)
        part = self._stage_step(micro, np.ceil(np.asarray(sequences) / pp),
                                tuple(Keys(*(getattr(k, f.name) / pp for f in dataclasses.fields(k)))
                                      for k in attention_kernels(keys)))
        handed = self.handoff_seconds(micro)
        shown = np.maximum(handed - part.chip, 0.0)  # the hand-off overlaps the next micro-batch's compute
        return StepCost(part.compute * pp, part.memory * pp, part.overhead * pp, (part.comm + shown) * pp,
                        self.overlap)

    def handoff_seconds(self, tokens) -> np.ndarray:
        """Seconds a stage's hidden states of `tokens` tokens take to the next stage (chip 0 to chip tp)."""
        nbytes = np.asarray(tokens, dtype=np.float64) * self.arch.dim * ACT_BYTES
        if self._handoff is None:  # a transfer's latency, and its time per byte beyond it
            one, big = (self.topology.predict_transfers([(0, self.split.world(self.arch), n)]) for n in (1, 1 << 20))
            self._handoff = (one, (big - one) / ((1 << 20) - 1))
        latency, per_byte = self._handoff
        return np.where(nbytes > 0, latency + (nbytes - 1) * per_byte, 0.0)

    def _stage_step(self, tokens, sequences, keys) -> StepCost:
        a, s = self.arch, self.split
        dp = s.dp(a)
        t = np.asarray(tokens, dtype=np.float64) / dp   # tokens through this rank's attention
        seqs = np.asarray(sequences, dtype=np.float64) / dp
        hl, kvl = s.heads(a)
        pa, pw = attention_precision(self.precision), self.precision
        wa, ww, we = WEIGHT_BYTES[pa], WEIGHT_BYTES[pw], WEIGHT_BYTES[EMBED_PRECISION]
        kvb = WEIGHT_BYTES[self.kv_precision]
        d, hd = a.dim, a.head_dim

        def matmul(n_in, n_out, rows, wbytes, precision, kernels=1):
            return (2 * rows * n_in * n_out, n_in * n_out * wbytes + rows * (n_in + n_out) * ACT_BYTES, precision,
                    kernels)

        qkv = (hl + 2 * kvl) * hd
        layer = [matmul(d, qkv, t, wa, pa), matmul(hl * hd, d, t, wa, pa),
                 (np.zeros_like(t), t * d * ELEMENTWISE_PASSES * ACT_BYTES, "bf16", 4)]
        kv_row = 2 * kvl * hd * kvb
        kernels = attention_kernels(keys)
        for part in kernels:
            # the new tokens' K/V writes and q/output traffic, counted once over the step's kernels
            new = t / len(kernels)
            for n_layers, attended, read in ((a.full_layers, part.attended_full, part.read_full),
                                             (a.sliding_layers, part.attended_window, part.read_window)):
                if n_layers:
                    flops = 4 * hl * hd * attended / dp
                    nbytes = read / dp * kv_row + new * kv_row + 2 * new * hl * hd * ACT_BYTES
                    layer.append((flops * n_layers / a.n_layers, nbytes * n_layers / a.n_layers, "bf16",
                                  n_layers / a.n_layers))
        if a.moe:
            rows = np.ceil(t / s.tp)                                  # tokens this rank routes
            in_ep_group = t * dp * s.ep / self.nranks                 # tokens routed within this rank's EP group
            routed = in_ep_group * a.top_k / s.ep                     # rows this rank's experts compute
            touched = a.num_experts / s.ep * (1 - (1 - a.top_k / a.num_experts) ** in_ep_group)
            per_expert = 3 * d * a.ffn_dim
            layer.append(matmul(d, a.num_experts, rows, we, EMBED_PRECISION))
            layer.append((2 * routed * per_expert, touched * (per_expert * ww + (2 * a.ffn_dim + d) * we)
                          + routed * (2 * d + 3 * a.ffn_dim) * ACT_BYTES, pw, 3))
        else:
            f = a.ffn_dim // s.tp
            layer += [matmul(d, 2 * f, t, ww, pw), matmul(f, d, t, ww, pw)]
        compute, memory, overhead = self._price_ops(layer, a.n_layers)
        vocab = math.ceil(a.vocab / s.tp)
        rest = [(np.zeros_like(t), t * d * ACT_BYTES, "bf16", 1),                       # embedding rows
                matmul(d, vocab, seqs + np.zeros_like(t), we, EMBED_PRECISION, 2)]      # LM head, argmax
        c2, m2, o2 = self._price_ops(rest, 1)
        if np.ndim(tokens) or np.ndim(sequences):
            t_all, s_all = np.broadcast_arrays(np.asarray(tokens), np.asarray(sequences))
            comm = np.asarray([self.comm_seconds(int(x), int(y)) for x, y in zip(t_all.ravel(), s_all.ravel())]
                              ).reshape(t_all.shape)
        else:
            comm = self.comm_seconds(int(tokens), int(sequences))
        return StepCost(compute + c2, memory + m2, overhead + o2, comm, self.overlap)

    def _price_ops(self, ops, times: int):
        chip = self.chip
        compute = memory = 0.0
        overhead = 0.0
        for flops, nbytes, precision, kernels in ops:
            tc, tm = flops / chip.flops(precision), nbytes / chip.bandwidth
            compute = compute + np.where(tc >= tm, tc, 0.0) * times
            memory = memory + np.where(tc >= tm, 0.0, tm) * times
            overhead += kernels * chip.kernel_overhead_us * 1e-6 * times
        return compute, memory, np.asarray(overhead)

    # ---- communication -----------------------------------------------------------------------------------
    def collectives(self, tokens: int, sequences: int):
        """The calls of one step on one rank (its data-parallel share of the batch)."""
        dp = self.split.dp(self.arch)
        return forward_collectives(self.arch, self.split, -(-tokens // dp), max(1, -(-sequences // dp)), ACT_BYTES,
                                   compress=self.compress)

    def comm_seconds(self, tokens: int, sequences: int) -> float:
        """Seconds in the collectives of one step.  Every layer issues the same calls, so a 1-layer and
        a 2-layer model give the rest (embedding, LM head) and one layer's share; the step is their sum."""
        key = (tokens, sequences)
        if key not in self._comm:
            dp = self.split.dp(self.arch)
            t, s = -(-tokens // dp), max(1, -(-sequences // dp))
            one, two = (sum(self.price(c) for c in forward_collectives(layers, self.split, t, s, ACT_BYTES,
                                                                       compress=self.compress))
                        for layers in self._one_two)
            if len(self._comm) > 1 << 16:  # callers with ever-new step shapes: keep the memory bounded
                self._comm.clear()
            self._comm[key] = one + (two - one) * (self.arch.n_layers - 1)
        return self._comm[key]

    def price(self, c: Collective) -> float:
        key = (c.kind, c.nbytes, c.size)
        if key not in self._priced:
            if c.kind in SENDS_TOTAL:  # every rank's total spread evenly over the group (balanced routing)
                transfers = uniform_matrix([c.nbytes] * c.size, list(range(c.size)))
                self._priced[key] = float(self.topology.predict_transfers(transfers)) if transfers else 0.0
            else:
                self._priced[key] = float(self.topology.predict(c.kind, c.nccl_bytes, c.size))
        return self._priced[key]

    def link_joules_per_token(self) -> float:
        """Energy the collectives of a step spend per token on the links: what every rank must send (the
        bandwidth-optimal bytes) over the hops between two chips (two through a switch, one on a direct
        link), at the chip's links' mean energy per bit."""
        if self._link_j is None:
            spec = self.topology.spec
            chip = spec.placement[0]
            mine = [lk for lk in spec.links if chip in (lk.a, lk.b)]
            chips = {c.name for c in spec.chips}
            hops = 1 if all(lk.a in chips and lk.b in chips for lk in mine) else 2
            pj = sum(lk.energy_pj_per_bit for lk in mine) / len(mine) if mine else 0.0
            probe = 1024
            sent = sum(_bytes_out(c) for c in self.collectives(probe, 1)) * self.nranks
            self._link_j = sent * 8 * pj * 1e-12 * hops / probe
        return self._link_j

    def _injection_gbps(self, chip: str) -> float:
        """GB/s per direction one chip's own links carry (the most any collective can move per chip)."""
        return sum(lk.bandwidth_gbps for lk in self.topology.spec.links if chip in (lk.a, lk.b))

    # ---- floors ------------------------------------------------------------------------------------------
    def floor(self, tokens, sequences: int, keys):
        """Seconds no schedule can beat: per chip the weights it must stream (the experts the step
        touches) and the KV cache it must read at peak bandwidth, or its FLOPs at peak, whichever is
        more; plus the bytes each collective must move over the chip's links at line rate."""
        a, s, chip = self.arch, self.split, self.chip
        dp = s.dp(a)
        t = np.asarray(tokens, dtype=np.float64)
        keys = total_keys(keys)
        _, kvl = s.heads(a)
        kv = 2 * kvl * a.head_dim * WEIGHT_BYTES[self.kv_precision] / dp * (
            a.full_layers * keys.read_full + a.sliding_layers * keys.read_window)
        weights = self.weight_bytes()  # all but an untied embedding table, of which a step reads only its rows
        if not a.tied:
            weights -= math.ceil(a.vocab / s.tp) * a.dim * WEIGHT_BYTES[EMBED_PRECISION]
        attn, mlp = self.layer_params()
        if a.moe:  # only the experts the step's tokens touch need reading, and only their rows computing
            in_ep_group = t * s.ep / self.nranks
            untouched = a.num_experts / s.ep * (1 - a.top_k / a.num_experts) ** in_ep_group
            weights = weights - a.n_layers * untouched * mlp / (a.num_experts // s.ep) * WEIGHT_BYTES[self.precision]
            flops = 2 * a.n_layers * (t / dp * attn + t * a.top_k / self.nranks * mlp / (a.num_experts // s.ep))
        else:
            flops = 2 * a.n_layers * t * (attn + mlp)
        hl, _ = s.heads(a)
        flops = flops + 4 * hl * a.head_dim / dp * (a.full_layers * keys.attended_full +
                                                     a.sliding_layers * keys.attended_window)
        chip_s = np.maximum((weights + kv) / (chip.memory_bandwidth_gbps * 1e9),
                            flops / chip.peak_flops(self.precision))
        moved = sum(_bytes_out(c) for c in self.collectives(int(np.max(t)), sequences))
        return chip_s + moved / (self.links_gbps * 1e9)


def _bytes_out(c: Collective) -> float:
    """Bytes one rank must send in a collective, whatever the algorithm (bandwidth-optimal bounds)."""
    n, size = c.size, c.nccl_bytes
    if n < 2:
        return 0.0
    if c.kind == "all_reduce":
        return 2 * (n - 1) / n * size
    if c.kind in SENDS_TOTAL:
        return (n - 1) / n * c.nbytes
    return (n - 1) / n * size
