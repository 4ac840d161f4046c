"""The EMA under FSDP: each rank keeps the shadow weights of its own pieces of the parameters.

With `use_orig_params`, FSDP leaves every parameter, outside forward and backward, as a 1-D view
of this rank's piece of its unit's flat parameter (empty where the piece holds none of it). The
EMA's update, swap and restore are elementwise, so shadow pieces shaped as those views follow
them exactly as the whole EMA follows whole weights, at 1/world_size of its memory on each GPU.
Whole shadow weights exist only around a checkpoint: `gather` assembles them for saving, `scatter`
cuts whole ones (the freshly built EMA's, or a checkpoint's) into this rank's pieces. Both move the
shadows through the parameters' own place with `FullyShardedDataParallel.summon_full_params`, so
they need nothing of how FSDP lays out its flat parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ldm.checkpoint import EMA_PREFIX, SHARDED_MODEL_KEY, CheckpointError
from ldm.modules.ema import LitEma, named_parameters


def followed(ema: LitEma, target: nn.Module) -> dict[str, nn.Parameter]:
    """{shadow name: parameter} of what the EMA follows in (wrapped) `target`."""
    params = named_parameters(target)
    return {shadow: params[name] for name, shadow in ema.m_name2s_name.items()}


@torch.no_grad()
def scatter(root: FullyShardedDataParallel, ema: LitEma, target: nn.Module, whole: Mapping) -> None:
    """Give `ema` this rank's pieces of the `whole` shadow weights ({shadow name: tensor}):
    written into the gathered parameters, read back as this rank's views, and the weights put
    back. A collective: every rank calls it, before training or after loading a checkpoint."""
    params = followed(ema, target)
    missing = sorted(set(params) - set(whole))
    if missing:
        raise CheckpointError(
            f"use_ema is true but the checkpoint has no EMA weights for {len(missing)} "
            f"parameters ({EMA_PREFIX}{missing[0]}, ...); resume with model.params.use_ema=false"
        )
    with FullyShardedDataParallel.summon_full_params(root, writeback=True):
        weights = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        for name, p in params.items():
            p.copy_(whole[name])
    ema.adopt_pieces({name: p.detach().clone() for name, p in params.items()})
    with FullyShardedDataParallel.summon_full_params(root, writeback=True):
        for name, p in params.items():
            p.copy_(weights[name])


@torch.no_grad()
def gather(
    root: FullyShardedDataParallel, ema: LitEma, target: nn.Module, *, rank0_only: bool
) -> dict[str, torch.Tensor]:
    """The whole shadow weights on the CPU as state-dict entries (`model_ema.<shadow name>`), on
    rank 0 alone with `rank0_only` (the others get {}). A collective, as FSDP's state_dict."""
    params = followed(ema, target)
    pieces = ema.tensors()
    weights = {name: p.detach().clone() for name, p in params.items()}  # this rank's pieces
    for name, p in params.items():
        p.copy_(pieces[name])
    whole = {}
    try:
        # not offload_to_cpu, which FSDP refuses for NO_SHARD: each tensor is copied out instead
        with FullyShardedDataParallel.summon_full_params(
            root, writeback=False, rank0_only=rank0_only
        ):
            if not rank0_only or dist.get_rank() == 0:
                whole = {
                    EMA_PREFIX + name: p.detach().to("cpu", pieces[name].dtype, copy=True)
                    for name, p in params.items()
                }
    finally:
        for name, p in params.items():
            p.copy_(weights[name])
    return whole


def read_sharded_shadows(path: Path, ema: LitEma) -> dict[str, torch.Tensor]:
    """{shadow name: whole tensor} of the EMA in a sharded checkpoint directory, as Lightning's
    FSDPStrategy saved it (under its "model" entry), read in full by every rank."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    template = {}
    for name in ema.m_name2s_name.values():
        entry = stored.get(f"{SHARDED_MODEL_KEY}.{EMA_PREFIX}{name}")
        if entry is not None:
            template[EMA_PREFIX + name] = torch.empty(entry.size, dtype=entry.properties.dtype)
    dcp.load({SHARDED_MODEL_KEY: template}, storage_reader=reader)
    return {key.removeprefix(EMA_PREFIX): value for key, value in template.items()}
