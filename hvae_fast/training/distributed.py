"""Data-parallel training over the processes that torchrun starts (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; ``setup`` joins the process
group, NCCL on CUDA (process r on cuda:LOCAL_RANK) and gloo on CPU. A run without torchrun (or with
one process) gets ``World()``, whose collectives are the identity.

How W processes train like one process with batch B (``--batch-size`` is the global batch B, a
multiple of W): every process reads the same global batch from its own copy of the data stream and
keeps its rows ``World.rows(B)`` = [r B/W, (r+1) B/W). Around the training forward ``World.shard``
makes every process draw the encoder noise of the whole batch and keep its rows (so torch's RNG
advances alike everywhere), and ``shard_backend`` does the same for the torch OU backend's noise.
With ``--backend torch`` the W processes thus see the data and noise of one process, and DDP's mean
of the gradients over processes is the gradient of the global batch mean. The fused OU backends
(cpp, triton, cuda) place noise by Philox offset in the whole [K, B, ...] tensor; drawing it for the
global batch would cost W times the memory, so each process gets its own Philox seed instead: their
runs match one process in distribution, not bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from ..ops.backends import SEED_LIMIT, Backend
from ..distributions import batch_shard
from ..errors import HVAEError

log = logging.getLogger("hvae_fast.training.distributed")

# An odd 64-bit constant: seed + rank * SEED_STRIDE (mod SEED_LIMIT) differs for every rank.
SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among ``size`` data-parallel processes (``local_size`` per node); the
    collectives run on ``device`` (NCCL reduces CUDA tensors only)."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, holds the run directory's lock and writes its files."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's contiguous share of n rows (sizes differ by at most one)."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def shard(self, n: int):
        """Context for a forward on ``rows(n)`` of an n-row batch: draw the whole batch's noise."""
        if self.size == 1:
            return contextlib.nullcontext()
        r = self.rows(n)
        return batch_shard(r.start, r.stop - r.start, n)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """``op`` of ``t`` elementwise over processes, detached (``t`` itself with one process)."""
        if self.size == 1:
            return t
        out = t.detach().to(self.device, copy=True)  # NCCL reduces on the process's GPU
        dist.all_reduce(out, op=op)
        return out.to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.size == 1 else self.sum(t) / self.size

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: str | None) -> None:
        """Stop every process if any passes an error message: rank 0 raises HVAEError(message) (the
        CLI prints it), the others exit with the same status 2 without repeating it."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            if self.main:
                raise HVAEError(errors[0])
            raise SystemExit(2)


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group if WORLD_SIZE > 1; (World, the device this process trains on)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device), device
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise HVAEError(f"torchrun started {local_size} processes on this node but it has {n} GPUs: "
                            f"pass --nproc_per_node {n} (or fewer)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if rank:
        logging.getLogger("hvae_fast").setLevel(logging.WARNING)  # rank 0 logs for the run
    return World(rank, size, local_size, device, backend), device


def teardown(barrier: bool = False) -> None:
    """Leave the process group; ``barrier`` (a normal end, every process here) first waits for the
    others, so that no process tears its connections down while rank 0 still writes the last
    checkpoint (a 2-process gloo run aborted at exit now and then without it)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def launch_command(world: World) -> str:
    """The launcher prefix that starts ``world`` again: '' for one process, else torchrun's."""
    if world.size == 1:
        return ""
    nodes = world.size // world.local_size
    return "torchrun " + (f"--nnodes {nodes} " if nodes > 1 else "") + f"--nproc_per_node {world.local_size} -m "


def shard_backend(backend: Backend, world: World) -> Backend:
    """``backend`` for this process's rows of the training batch (see the module docstring): the
    torch backend draws the OU noise of the whole batch, a fused one gets a seed of this rank's own."""
    if world.size == 1:
        return backend
    if backend.name == "torch":
        def correlated_samples(z, mu, sigma, rho, K, seed):
            # z, mu, sigma [b, *S]: place them at rows r*b of a zero [W*b, *S] batch, keep our rows of the result.
            b, first = z.shape[0], world.rank * z.shape[0]

            def whole(t):
                t = t.expand_as(z)
                return torch.cat([t.new_zeros((first, *t.shape[1:])), t,
                                  t.new_zeros(((world.size - 1) * b - first, *t.shape[1:]))])

            out = backend.correlated_samples(whole(z), whole(mu), whole(sigma), rho, K, seed)
            return out[:, first:first + b]
    else:
        def correlated_samples(z, mu, sigma, rho, K, seed):
            return backend.correlated_samples(z, mu, sigma, rho, K, (seed + world.rank * SEED_STRIDE) % SEED_LIMIT)
    return dataclasses.replace(backend, correlated_samples=correlated_samples)
