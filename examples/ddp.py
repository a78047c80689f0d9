"""A small DistributedDataParallel training run over gloo, for CPUs.

    srun -N2 --ntasks-per-node=2 --ml-container=pytorch python3 ddp.py [STEPS]

Everything distributed comes from the environment the plugin sets
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK): init_method="env://".
Each rank trains on its own random batches; DDP averages the gradients, so
after every step the model is the same on every rank. The script checks
that, and an all_reduce, and prints one line per rank.

It ends with destroy_process_group() and os._exit(): with Debian's torch 2.6
about one process in ten otherwise dies *after* finishing, in an interpreter
shutdown race (`terminate called without an active exception`, SIGABRT),
with or without a container (shared/PLATFORM.md).
"""
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> int:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    # One thread per rank: ranks share the node's cores.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))

    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    expected = world * (world + 1) / 2

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1000 + rank)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = torch.randn(32, 8, generator=data)
        y = x.sum(dim=1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    identical = torch.equal(hi, lo)
    ok = identical and total.item() == expected
    params = ",".join(f"{v:.6f}" for v in flat.tolist())
    line = (
        f"rank {rank}/{world} local {local} host {socket.gethostname()} "
        f"port {os.environ.get('MASTER_PORT')} all_reduce {total.item():g} "
        f"expected {expected:g} identical {identical} loss {loss.item():.4f} "
        f"params {params}\n"
    )
    # One write(2): under torchrun the workers of a node share one stdout.
    os.write(1, line.encode())
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
