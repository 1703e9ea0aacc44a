"""Data-parallel training under torchrun: PyTorch's own DistributedDataParallel and FSDP2.

    torchrun --nproc_per_node 2 -m lmzoo finetune ... --strategy ddp    # or fsdp

Each process takes its share of every global batch; the loss is normalised by the number of
labelled tokens of the whole global batch, so N processes follow the same loss curve as one
process with the same global batch. Gloo serves CPUs, NCCL serves GPUs (one per process,
several nodes via torchrun's --nnodes/--rdzv-endpoint).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LmzooError

STRATEGIES = ("ddp", "fsdp")


class _Loss(nn.Module):
    """DDP synchronises gradients in its forward: the loss must be computed inside it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask, scale=1.0):
        return self.model.loss(input_ids, labels, attention_mask=attention_mask, reduction="sum", scale=scale)


class World:
    def __init__(self, strategy: str):
        if strategy not in STRATEGIES:
            raise LmzooError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if "RANK" not in os.environ:
            raise LmzooError(f"--strategy {strategy} needs torchrun: "
                             f"torchrun --nproc_per_node N -m lmzoo finetune ... --strategy {strategy}")
        self.strategy = strategy
        self.device = torch.device("cpu")
        backend = "gloo"
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            backend = "nccl"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def wrap(self, model) -> nn.Module:
        """Shard or replicate the model; returns what computes the summed loss."""
        model.to(self.device)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            return _Loss(model)
        from torch.nn.parallel import DistributedDataParallel

        # MoE experts that get no token in a step have no gradient: DDP must be told to expect that.
        return DistributedDataParallel(_Loss(model), find_unused_parameters=bool(model.config.n_experts))

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    # Checkpoints hold full (unsharded) tensors, so they load on any number of processes.
    def full_state(self, model) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in state.items() if k in trainable}

    def full_model_state(self, model) -> dict[str, torch.Tensor]:
        """Every parameter, gathered whole (a collective: all processes call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state(self, model, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
