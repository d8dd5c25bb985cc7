"""raypatch.overlap: the all-reduce during the backward gives every rank the average of the ranks' accumulated
gradients, clipped, exactly as an all-reduce after the backward and torch's clipping do, and carries the step's
flags with it. Two gloo processes, no Ray, no DeepSpeed."""

from __future__ import annotations

import socket
import types

import torch
import torch.multiprocessing as mp

CLIP = 0.05


def rank_main(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from raypatch.overlap import OverlappedAllReduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 50))
    ref = [p.detach().clone() for p in model.parameters()]
    engine = types.SimpleNamespace(module=model, enable_backward_allreduce=True)
    # Several buckets for a model this small; a clip norm these gradients exceed, so that clipping acts.
    overlap = OverlappedAllReduce(engine, bucket_bytes=2048, clip=CLIP)
    assert engine.enable_backward_allreduce is False and len(overlap.buckets) > 2
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 50, (4, 7), generator=g) for _ in range(3)]

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 50), x[:, 1:].reshape(-1)) / 3

    for step in range(2):  # twice: the state is reset between steps
        model.zero_grad()
        for i, x in enumerate(batches):
            last = i == len(batches) - 1
            overlap.arm(last, torch.tensor([float(rank), 1.0 + step]) if last else None)
            loss_of(x).backward()
        flags = overlap.finish()
        out[f"{rank}-{step}-flags"] = flags.tolist()
        got = [p.grad.clone() for p in model.parameters()]
        # The reference: the same accumulation, then a plain all-reduce of every gradient after the backward.
        model.zero_grad()
        overlap.arm(False)
        for x in batches:
            loss_of(x).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(2)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        want = [p.grad.clone() for p in model.parameters()]
        out[f"{rank}-{step}-clipped"] = bool(norm > CLIP)
        out[f"{rank}-{step}"] = all(torch.equal(a, b) for a, b in zip(got, want))
    out[f"{rank}-params"] = all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    dist.destroy_process_group()


def test_overlapped_allreduce_equals_allreduce_after_backward():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.start_processes(rank_main, args=(port, out), nprocs=2, start_method="spawn")
        want = {f"{r}-{s}": True for r in (0, 1) for s in (0, 1, "params", "0-clipped", "1-clipped")}
        want |= {f"{r}-{s}-flags": [1.0, 2.0 + 2 * s] for r in (0, 1) for s in (0, 1)}  # ranks 0+1, (1+step)·2
        assert dict(out) == want
