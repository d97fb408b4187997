"""Several processes under `torchrun`: the process group, wrapping the model, and the few collectives
the trainer needs.

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK. With a single
process (`python -m model.train`) every helper here is a no-op, so a one-process run is exactly
what it was. The model never imports this module (torchtitan's split): the trainer builds a plain
model and wraps it here: DDP (a replica per process, gradients averaged) by default, FSDP2
(`fully_shard` per Transformer block, then the root) with `train.parallelism: fsdp`.

Checkpoints keep the one-process format (one safetensors file of full tensors, an index-keyed
optimizer state): under FSDP2 the full state dicts are gathered to rank 0, and loaded back from
full state dicts on every process, so a run saved with N processes resumes with M.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes metrics, checkpoints and the summary."""
        return self.rank == 0


_flag_group = None  # a gloo group for host-side flags (SIGTERM), so that checking them never syncs a GPU


def world_from_env() -> World:
    """The world torchrun describes in the environment; one process without it."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns the world and this process's device."""
    global _flag_group
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    _flag_group = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return world, device


def teardown() -> None:
    global _flag_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _flag_group = None


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (around rank 0's saves); nothing with one process."""
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, world: World, parallelism: str, device: torch.device,
         find_unused_parameters: bool = False) -> nn.Module:
    """The module the training step calls: the model itself with one process, else DDP or FSDP2.

    FSDP2 shards in place (the returned module is `model`, its parameters now DTensors); DDP returns
    a wrapper around `model`. Either way `model` stays the module whose state is saved.
    """
    if not world.distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from model.transformer import Block

        for module in model.modules():  # one all-gather per block: only one block's full weights at a time
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)  # embeddings, heads and norms outside the blocks
        return model
    from torch.nn.parallel import DistributedDataParallel

    # No buffer changes in training (no batch norm; position tables are constants): nothing to sync per forward.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, forward_sync_buffers=False)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-batch."""
    if hasattr(wrapped, "no_sync") and not enabled:  # DDP
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(enabled)
    yield


def token_weight(n_local, world: World, device: torch.device) -> torch.Tensor | float:
    """The factor that turns this process's mean loss into its share of the global-batch mean.

    An objective averages its loss over the tokens it predicts in the micro-batch it is given. DDP
    and FSDP average gradients over processes, which is the mean of the per-process means; when the
    processes predict different numbers of tokens (dynamic masking draws ~15% per row) that differs
    from one process's mean over the whole batch. Weighting process r by n_r * world / sum(n) makes
    the averaged gradient exactly the global mean's, so N processes train like one. One small
    all-reduce per micro-batch; `torch.full` puts the count on the device without a host sync.
    """
    if not world.distributed:
        return 1.0
    n = n_local.detach().to(device, torch.float64) if torch.is_tensor(n_local) else \
        torch.full((), float(n_local), dtype=torch.float64, device=device)
    total = n.clone()
    dist.all_reduce(total)
    return (n * world.size / total.clamp(min=1)).float()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a scalar over processes (a logged loss); the value itself with one process."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def sum_(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over processes (evaluation's loss and token totals)."""
    if world.distributed:
        dist.all_reduce(values)
    return values


def any_flag(flag: bool, world: World) -> bool:
    """True on every process when it is true on any (a SIGTERM that reached one process stops all at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group)
    return bool(t.item())


def plain_norm(grad_norm: torch.Tensor) -> torch.Tensor:
    """FSDP2's gradient norm is a replicated DTensor; the same norm as a plain tensor."""
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU: complete on rank 0, empty elsewhere. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state in `optimizer.state_dict()`'s layout (parameters numbered in
    param-group order), complete on rank 0. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:
        return {}
    index = {fqn: i for i, fqn in enumerate(fqn for group in sd["param_groups"] for fqn in group["params"])}
    return {"state": {index[fqn]: value for fqn, value in sd["state"].items()},
            "param_groups": [{**group, "params": [index[fqn] for fqn in group["params"]]}
                             for group in sd["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load an index-keyed full optimizer state (a checkpoint's) into the sharded optimizer of `model`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[int(i)]: value for i, value in sd["state"].items()},
               "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                                for group in sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))
