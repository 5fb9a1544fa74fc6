"""torch's own distributed libraries on backend "ncl" where they once failed (issue 22): the
program test_torch_backend.py runs under `ncl-run -n 2`.  Each case is checked against a
single-process reference computed on every rank; each rank writes OUT_DIR/rank<r>.json with
its failures.  Every wait is bounded (NCL_TIMEOUT and the work timeouts below), so a deadlock
becomes a failure.

  device     the group lists the CPU (`_device_types`), as gloo's does
  ring       batch_isend_irecv ring of 1 MiB messages (every rank sends first)
  pipeline   Schedule1F1B, 2 stages, 4 MiB activations: loss and gradients as one process
  dcp        DCP async_save, then load: the same tensors
  fsdp2      set_model_state_dict(broadcast_from_rank0=True) into a fully_shard model
  any_source recv and irecv without src: the sender's rank and its data
  coalesced  all_gather_coalesced; all_reduce, all_gather_into_tensor and reduce_scatter_tensor
             under _coalescing_manager
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import ncl.torch  # noqa: F401  (registers the backend)

WAIT_S = 60


def _model(seed: int, width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def device(me, n, check, tmp):
    check("cpu in _device_types", torch.device("cpu") in dist.group.WORLD._device_types)
    check("object collectives on the cpu", dist.distributed_c10d._get_object_coll_device() == "cpu")


def ring(me, n, check, tmp):
    right, left = (me + 1) % n, (me - 1) % n
    x = torch.full((1 << 18,), float(me))
    got = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, right), dist.P2POp(dist.irecv, got, left)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    check("ring 1 MiB from the left", torch.equal(got, torch.full_like(x, float(left))))


def pipeline(me, n, check, tmp):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    width, micro, chunks = 1024, 1024, 4  # activations (1024, 1024) float32: 4 MiB each
    full = _model(7, width, n)
    torch.manual_seed(8)
    x, target = torch.randn(micro * chunks, width), torch.randn(micro * chunks, width)
    loss_fn = torch.nn.MSELoss()
    stage_mod = _model(7, width, n)[me]
    stage = PipelineStage(stage_mod, me, n, torch.device("cpu"))
    schedule = Schedule1F1B(stage, chunks, loss_fn=loss_fn)  # (it divides gradients by chunks)
    losses = []
    if me == 0:
        schedule.step(x)
    else:
        schedule.step(target=target, losses=losses)
    ref = sum(loss_fn(full(xc), tc) / chunks for xc, tc in zip(x.chunk(chunks), target.chunk(chunks)))
    ref.backward()
    if me == n - 1:
        check("1F1B loss", torch.allclose(sum(losses) / chunks, ref, rtol=1e-4, atol=1e-6))
    check("1F1B weight grad", torch.allclose(stage_mod.weight.grad, full[me].weight.grad, rtol=1e-3, atol=1e-5))


def dcp(me, n, check, tmp):
    import torch.distributed.checkpoint as dcp_
    state = {"w": torch.arange(12.0).reshape(3, 4) + me * 0, "step": torch.tensor(5)}
    future = dcp_.async_save(state, checkpoint_id=os.path.join(tmp, "ckpt"))
    future.result(timeout=WAIT_S)
    loaded = {"w": torch.zeros(3, 4), "step": torch.tensor(0)}
    dcp_.load(loaded, checkpoint_id=os.path.join(tmp, "ckpt"))
    check("async_save then load", torch.equal(loaded["w"], state["w"]) and loaded["step"].item() == 5)


def fsdp2(me, n, check, tmp):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    reference = _model(11, 8, 2)
    model = _model(12, 8, 2)  # other weights: the load must replace them
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    full = reference.state_dict() if me == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if me == 0:
        check("broadcast_from_rank0 into FSDP2", all(torch.equal(got[k], v) for k, v in reference.state_dict().items()))


def any_source(me, n, check, tmp):
    if me != 0:
        for k in range(2):
            dist.send(torch.full((300_000,), float(me * 10 + k)), 0)
        return
    for k in range(2 * (n - 1)):
        t = torch.empty(300_000)
        if k % 2:
            work = dist.irecv(t)
            work.wait()
            src = work._source_rank()
        else:
            src = dist.recv(t)
        check(f"any source message {k}", 0 < src < n and t[0].item() in (src * 10, src * 10 + 1)
              and torch.equal(t, torch.full_like(t, t[0].item())))


def coalesced(me, n, check, tmp):
    ins = [torch.full((2, 3), float(me)), torch.arange(4.0) + me]
    outs = [[torch.empty_like(t) for t in ins] for _ in range(n)]
    dist.all_gather_coalesced(outs, ins)
    check("all_gather_coalesced", all(torch.equal(outs[r][0], torch.full((2, 3), float(r))) and
                                      torch.equal(outs[r][1], torch.arange(4.0) + r) for r in range(n)))
    a, b = torch.full((3,), float(me)), torch.full((5,), 2.0 * me)
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_reduce(a)
        dist.all_reduce(b)
    cm.wait()
    total = sum(range(n))
    check("coalesced all_reduce", torch.equal(a, torch.full((3,), float(total))) and
          torch.equal(b, torch.full((5,), 2.0 * total)))
    gathered, scattered = [torch.empty(2 * n) for _ in range(2)], [torch.empty(2) for _ in range(2)]
    with dist._coalescing_manager():
        for k in range(2):
            dist.all_gather_into_tensor(gathered[k], torch.full((2,), float(me + k)))
    with dist._coalescing_manager():
        for k in range(2):
            dist.reduce_scatter_tensor(scattered[k], torch.arange(2.0 * n) + k)
    check("coalesced all_gather_into_tensor", all(torch.equal(gathered[k], torch.arange(float(n)).add(k)
                                                              .repeat_interleave(2)) for k in range(2)))
    check("coalesced reduce_scatter_tensor", all(torch.equal(scattered[k], (torch.arange(2.0) + 2 * me + k) * n)
                                                 for k in range(2)))


CASES = {"device": device, "ring": ring, "pipeline": pipeline, "dcp": dcp, "fsdp2": fsdp2, "any_source": any_source,
         "coalesced": coalesced}


def main(out_dir: str, names) -> None:
    dist.init_process_group("ncl")
    me, n = dist.get_rank(), dist.get_world_size()
    failures = []

    def check(label, ok):
        if not ok:
            failures.append(f"{label} rank={me}/{n}")
    for name in names:
        try:
            CASES[name](me, n, check, out_dir)
        except Exception as exc:  # one case's failure must not hide the others'
            failures.append(f"{name} rank={me}: {type(exc).__name__}: {exc}")
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{me}.json"), "w") as f:
        json.dump({"rank": me, "failures": failures}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(CASES))
