"""Block-scaled compressed collectives (ncl/compress.py) against float64 references with each format's
documented bound; bitwise agreement across ranks and staging sizes; bad arguments refused before any call.

Bound of one quantization, per element, as a share of its block's largest magnitude (OCP MX v1.0 scaling,
max |v| / 2^e in [2^emax, 2^(emax+1))): MXFP8 (E4M3, max 448, 3 mantissa bits): saturating (448, 512) costs
at most 64 / 256 = 1/4; MXINT8 (step 2^-6, max 127/64): at most 1/64; MXFP4 (E2M1, max 6, step 2 in [4, 6]):
saturating (6, 8) costs at most 2 / 4 = 1/2."""
import numpy as np
import pytest

import ncl

from harness import SMALL_STAGING, as_numpy, as_torch, case_seed, digest
from ncl import compress
from ncl.buffers import ReduceOp

SHARE_OF_BLOCK_MAX = {"fp8": 1 / 4, "int8": 1 / 64, "mxfp4": 1 / 2}
# the typical error, pinned: RMS of (decoded - exact) over RMS of exact, one quantization of normal data
RMS_BOUND = {"fp8": 0.05, "int8": 0.01, "mxfp4": 0.2}


def _block_max(v: np.ndarray) -> np.ndarray:
    """Each element's block's largest magnitude (float64)."""
    b = np.abs(v.astype(np.float64)).reshape(-1, compress.BLOCK).max(axis=1)
    return np.repeat(b, compress.BLOCK)


@pytest.mark.parametrize("name", sorted(compress.FORMATS))
def test_one_quantization_is_within_its_bound(name):
    fmt = compress.FORMATS[name]
    rng = np.random.default_rng(case_seed("quantize", name))
    # normal data with outliers and blocks spanning 1e-30 .. 1e30
    v = rng.standard_normal(32 * 256).astype(np.float32)
    v[::97] *= 1000
    v *= np.repeat(10.0 ** rng.integers(-30, 30, 256), 32).astype(np.float32)
    packed = compress.quantize(v, fmt)
    assert packed.dtype == np.uint8 and packed.size == compress.packed_bytes(v.size, fmt)
    got = compress.dequantize(packed, v.size, fmt).astype(np.float64)
    err = np.abs(got - v.astype(np.float64))
    assert np.all(err <= SHARE_OF_BLOCK_MAX[name] * _block_max(v) * (1 + 1e-6))
    normal = rng.standard_normal(32 * 256).astype(np.float32)
    back = compress.dequantize(compress.quantize(normal, fmt), normal.size, fmt)
    assert np.sqrt(np.mean((back - normal) ** 2) / np.mean(normal ** 2)) <= RMS_BOUND[name]


@pytest.mark.parametrize("name", sorted(compress.FORMATS))
def test_exact_values_zero_blocks_and_non_finite_blocks(name):
    fmt = compress.FORMATS[name]
    v = np.zeros(96, np.float32)
    v[32:64] = np.arange(32) % 2 * 2.0 - 1.0       # +-1: exact in every format
    v[64] = np.nan
    v[70] = np.inf
    got = compress.dequantize(compress.quantize(v, fmt), 96, fmt)
    assert np.array_equal(got[:64], v[:64]) and np.all(np.isnan(got[64:]))
    assert compress.bytes_per_value(fmt) == {"fp8": 33 / 32, "int8": 33 / 32, "mxfp4": 17 / 32}[name]


class _Refusing:
    """A communicator stand-in that fails the test if any collective is called."""
    size, rank = 2, 0

    def __getattr__(self, name):
        pytest.fail(f"{name} called before the arguments were checked")


@pytest.mark.parametrize("call, kwargs, error, message", [
    ("all_reduce", dict(compress="fp4"), ValueError, "compress must be one of fp8, int8, mxfp4"),
    ("all_reduce", dict(compress="fp8", op=ReduceOp.MAX), ValueError, "SUM and AVG, not MAX"),
    ("all_reduce", dict(compress="fp8", op="sum"), TypeError, "op must be an ncl.ReduceOp"),
    ("all_gather", dict(compress=None), ValueError, "compress must be one of"),
    ("reduce_scatter", dict(compress="int8"), TypeError, "float x"),
])
def test_bad_arguments_are_refused_before_any_call(call, kwargs, error, message):
    x = np.zeros(64, np.int32 if call == "reduce_scatter" else np.float32)
    with pytest.raises(error, match=message):
        getattr(compress, call)(_Refusing(), x, **kwargs)


# ---- on ranks --------------------------------------------------------------------------------------------------

def _data(seed, rank, count):
    rng = np.random.default_rng(seed * 100 + rank)
    v = rng.standard_normal(count) * np.exp(rng.uniform(-3, 3, count))
    v[rng.integers(0, count, 3)] *= 500        # outliers
    return v.astype(np.float32)


def _padded_block_max(v, padded):
    """_block_max of v laid out in `padded` values (zeros after it), for v's own elements."""
    w = np.zeros(padded, np.float64)
    w[:v.size] = v
    return _block_max(w)[:v.size]


def _all_reduce_bound(partials, name, avg=False):
    """Per element, what a compressed all_reduce of these per-rank values may miss the exact float64 sum
    by: every rank's quantization within its share of its block maximum, then the reduced chunk's
    requantization within its share of the reduced block maximum (bounded through the exact sum plus the
    first stage's error); AVG scales both by 1/n."""
    n, eps = len(partials), SHARE_OF_BLOCK_MAX[name]
    padded = compress._chunks(partials[0].size, n)[1]
    scale = 1 / n if avg else 1
    sent = np.sum([eps * _padded_block_max(p, padded) for p in partials], axis=0) * scale
    exact = np.sum([p.astype(np.float64) for p in partials], axis=0) * scale
    return exact, sent + eps * _padded_block_max(np.abs(exact) + sent, padded) + 1e-6 * np.abs(exact)


def _compressed_sweep(comm, seed, count, kind):
    """Every collective in every format on every rank's data; returns (failures, {case: digest}).
    References in float64 from every rank's data, with the bounds of the module doc: per element, each
    rank's contribution within its share of its block maximum, and (all_reduce) the reduced chunk's
    requantization within its share of the reduced block maximum."""
    n, me = comm.size, comm.rank
    datas = [_data(seed, r, count) for r in range(n)]
    exact = np.sum([d.astype(np.float64) for d in datas], axis=0)  # reduce_scatter's reference
    failures, digests = [], {}
    for name in sorted(compress.FORMATS):
        eps = SHARE_OF_BLOCK_MAX[name]
        for op in ("SUM", "AVG"):
            x = datas[me].copy()
            x = as_torch(x) if kind == "torch" else x
            got = as_numpy(compress.all_reduce(comm, x, name, ReduceOp[op])).astype(np.float64)
            again = as_numpy(comm.all_reduce(datas[me].copy(), ReduceOp[op], compress=name)).astype(np.float64)
            if not np.array_equal(got, again):
                failures.append(f"rank {me} {name} {op}: comm.all_reduce(compress=) differs from compress.all_reduce")
            want, bound = _all_reduce_bound(datas, name, avg=op == "AVG")
            bad = np.abs(got - want) > bound
            if bad.any():
                i = int(np.argmax(bad))
                failures.append(f"rank {me} {name} {op} all_reduce: element {i} got {got[i]}, exact {want[i]}, "
                                f"bound {bound[i]}")
            digests[f"{name} {op} all_reduce"] = digest(got)
        rows = count // n * n
        x = datas[me][:rows].copy()
        got = as_numpy(compress.reduce_scatter(comm, x, name)).astype(np.float64)
        block = rows // n
        want = exact[me * block:(me + 1) * block]
        bound = np.sum([eps * _padded_block_max(d[me * block:(me + 1) * block], -(-block // 32) * 32) for d in datas],
                       axis=0) + 1e-6 * np.abs(want)
        if (np.abs(got - want) > bound).any():
            failures.append(f"rank {me} {name} reduce_scatter beyond its bound")
        got = as_numpy(compress.all_gather(comm, datas[me][:block].copy(), name)).astype(np.float64)
        want = np.concatenate([d[:block] for d in datas]).astype(np.float64)
        bound = np.concatenate([eps * _padded_block_max(d[:block], -(-block // 32) * 32) for d in datas])
        if (np.abs(got - want) > bound * (1 + 1e-6)).any():
            failures.append(f"rank {me} {name} all_gather beyond its bound")
        digests[f"{name} all_gather"] = digest(got)
        x = datas[me][:rows].copy()
        got = as_numpy(compress.all_to_all(comm, x, name)).astype(np.float64)
        want = np.concatenate([d[me * block:(me + 1) * block] for d in datas]).astype(np.float64)
        bound = np.concatenate([eps * _padded_block_max(d[me * block:(me + 1) * block], -(-block // 32) * 32)
                                for d in datas])
        if (np.abs(got - want) > bound * (1 + 1e-6)).any():
            failures.append(f"rank {me} {name} all_to_all beyond its bound")
    return failures, digests


@pytest.mark.timeout(240)
@pytest.mark.parametrize("size, kind", [(3, "numpy"), (4, "torch")])
def test_compressed_collectives_within_bounds_and_bitwise_equal(pool_factory, size, kind):
    """Within the bounds on every rank; every rank's all_reduce and all_gather bitwise the same, and the
    same with tiny staging (many chunks and other algorithms moving the codes) as with the default."""
    if kind == "torch":
        pytest.importorskip("torch")
    seed = case_seed("compress", size, kind)
    by_env = []
    for env in ((), SMALL_STAGING):
        results = pool_factory(size, env).run(_compressed_sweep, seed, 5000 + size, kind, timeout=200)
        failures = [f for fs, _ in results for f in fs]
        assert not failures, "\n".join(failures[:20])
        digests = [d for _, d in results]
        assert all(d == digests[0] for d in digests), "ranks disagree bitwise"
        by_env.append(digests[0])
    assert by_env[0] == by_env[1], "staging size changed the bits"


def _trace_of_one_all_reduce(comm, count, name):
    x = np.ones(count, np.float32)
    compress.all_reduce(comm, x, name)
    return [(e["collective"], e["bytes"]) for e in comm.flight_record()[-2:]]


@pytest.mark.timeout(120)
def test_the_calls_a_compressed_all_reduce_issues_are_the_cost_models(pool_factory):
    """What the cost model prices for a compressed TP all-reduce (forward_collectives) is what the ranks do."""
    from ncl.models import get_config
    from ncl.topology.arch import Arch, Split, forward_collectives
    arch = Arch.of(get_config("llama-3.1-8b"))
    tokens = 7
    predicted = [(c.kind, c.nbytes) for c in forward_collectives(arch, Split(3), tokens, tokens, compress="fp8")[:2]]
    traced = pool_factory(3).run(_trace_of_one_all_reduce, tokens * arch.dim, "fp8", timeout=60)
    assert all(t == predicted for t in traced), (traced[0], predicted)


def test_compressed_all_reduces_cost_what_their_bytes_do():
    """Each activation all-reduce becomes an all_to_all and an all_gather of the format's bytes; the argmax
    all-reduces (MAX/MIN of values and indices) stay; a decode step's communication shrinks with the bytes."""
    from ncl.models import get_config
    from ncl.topology import load_topology
    from ncl.topology.arch import Arch, Split, forward_collectives
    from ncl.topology.inference import Keys, Server
    arch = Arch.of(get_config("llama-3.1-8b"))
    plain = forward_collectives(arch, Split(4), 32, 32)
    for name, fmt in compress.FORMATS.items():
        calls = forward_collectives(arch, Split(4), 32, 32, compress=name)
        acts = [c for c in plain if c.kind == "all_reduce" and c.nbytes == 32 * arch.dim * 2]
        assert len(calls) == len(plain) + len(acts)
        chunk = compress.packed_bytes(32 * arch.dim // 4, fmt)   # 32 x 4096 values over 4 ranks: whole blocks
        assert sum(c.kind == "all_to_all" and c.nbytes == chunk for c in calls) == len(acts)
    comm = {name: Server(load_topology("pcie-gen5-8card"), arch, Split(4), "bf16", compress=name).step(
        32, 32, Keys.decode([200] * 32, 0)).comm for name in (None, "fp8", "mxfp4")}
    assert comm["mxfp4"] < comm["fp8"] < comm[None]
    with pytest.raises(ValueError, match="compress must be one of"):
        Server(load_topology("pcie-gen5-8card"), arch, Split(4), "bf16", compress="fp6")


def _row_parallel_compressed(comm, name):
    """A RowParallelLinear with its sum compressed, against the full layer in float64 (every rank knows the
    full weights, so every rank's partial product and the bound)."""
    import torch
    from ncl.torch.tp import RowParallelLinear, compress_all_reduces
    torch.manual_seed(0)
    full = torch.nn.Linear(192, 96)
    x = torch.randn(5, 192) * torch.exp(torch.randn(5, 192))
    layer = compress_all_reduces(RowParallelLinear.from_full(full, comm, input_is_parallel=False), name)
    with torch.no_grad():
        got = layer(x).double().numpy().reshape(-1)
    w, xs = full.weight.detach().double(), x.double()
    shard = 192 // comm.size
    partials = [(xs[:, r * shard:(r + 1) * shard] @ w[:, r * shard:(r + 1) * shard].T).numpy().reshape(-1)
                for r in range(comm.size)]
    exact, bound = _all_reduce_bound(partials, name)
    exact = exact + np.tile(full.bias.double().detach().numpy(), 5)
    return float(np.max(np.abs(got - exact) - bound)), digest(got)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(compress.FORMATS))
def test_a_row_parallel_layer_sums_compressed_within_the_bound(pool_factory, name):
    pytest.importorskip("torch")
    results = pool_factory(3).run(_row_parallel_compressed, name, timeout=60)
    assert all(excess <= 0 for excess, _ in results), results
    assert len({d for _, d in results}) == 1


def test_the_communicator_takes_compress_and_refuses_it_async():
    comm = ncl.init()  # a group of one: the same path, no peers
    x = np.linspace(-3, 3, 100).astype(np.float32)
    want = compress.dequantize(compress.quantize(np.pad(x, (0, 28)), compress.FORMATS["int8"]), 128,
                               compress.FORMATS["int8"])[:100]
    want = compress.dequantize(compress.quantize(np.pad(want, (0, 28)), compress.FORMATS["int8"]), 128,
                               compress.FORMATS["int8"])[:100]  # quantized twice: contribution, then the sum
    assert np.array_equal(comm.all_reduce(x.copy(), compress="int8"), want)
    for kwargs in (dict(async_op=True), ):
        with pytest.raises(ValueError, match="not with async_op=True"):
            comm.all_reduce(x, compress="fp8", **kwargs)
    with comm.group(), pytest.raises(ValueError, match="inside comm.group"):
        comm.all_gather(x, compress="fp8")
    with pytest.raises(ValueError, match="compress must be one of"):
        comm.all_to_all(x, compress="e4m3")
    comm.close()
