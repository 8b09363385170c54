"""`train.fsdp`: the model's parameters, gradients and optimizer state sharded over the processes with torch's
FSDP2 (`torch.distributed.fsdp.fully_shard`), on GPUs (nccl) and on CPUs (gloo) alike, where accelerate's own
FSDP serves GPUs only.

Each encoder layer is an FSDP unit, and the rest of the model (embeddings, heads) one more: a layer's
weights are gathered for its forward and again for its backward, then freed, and its gradients are
reduce-scattered as its backward ends, so a step holds the full weights of one layer at a time beside
every process's 1/N of all weights, gradients and optimizer moments. Outside its layer's forward an
expert weight is a shard, so the model merges (data-independent routing) or casts (token routing) each
layer's experts inside that layer's call (`UniPerceiverMoEModel.experts_offloaded`), once per encoder pass
instead of once per step.

Checkpoints stay in the trainer's layout: `model.safetensors` holds the full weights and `optimizer.bin` the
full optimizer state keyed by parameter name (tensors, numbers and strings only: it loads with
`weights_only`), both gathered to process 0 to be written and read by every process to be loaded.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoints import OPTIMIZER_FILE, WEIGHTS_FILE



def shard_model(model: nn.Module, device_type: str, num_processes: int) -> nn.Module:
    """`model` (a `UniPerceiverMoEForGenericPerception`, already on its device) sharded in place over the
    `num_processes` processes of the default process group: each encoder layer one FSDP unit, the rest of
    the model another. Its parameters become DTensors holding this process's shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (num_processes,))
    for layer in model.uniperceiver.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `tensor`'s full value (a replicated DTensor, as `clip_grad_norm_` returns for
    sharded gradients, gathered; any other tensor as it is)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on the CPU of process 0 ({} on the others). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str, is_main: bool) -> None:
    """Write the full weights and optimizer state of a sharded model into `folder` (process 0 writes; every
    process must call it)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = full_model_state(model)
    moments = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if is_main:
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, os.path.join(folder, WEIGHTS_FILE),
                  metadata={"format": "pt"})
        torch.save(moments, os.path.join(folder, OPTIMIZER_FILE))


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Load `save_training_state`'s files into a sharded model and its optimizer; each process reads the
    full files and keeps its shards (every process must call it)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(os.path.join(folder, WEIGHTS_FILE)), options=options)
    moments = torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, moments, options=options)
