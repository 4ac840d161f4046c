"""The Trainer's strategy from `--strategy`: DDP without a per-step copy of the EMA, and sharded
training through Lightning's FSDP (or DeepSpeed ZeRO-2), wrapped at the UNet's blocks.

FSDP (Zhao et al. 2023, "PyTorch FSDP") shards each wrapped unit's parameters, gradients and
optimizer state across ranks and gathers a unit's weights only while it runs. Our units are the
UNet's blocks (`input_blocks.i`, `middle_block`, `output_blocks.i`: a ResBlock with its
SpatialTransformer and resampler) and the UNet's rest (`model`: time embedding and output
layers, around the blocks); the frozen first stage (and text encoder) stay whole on every
rank, outside the sharding (`ignored_modules`): they have no gradients or optimizer state to
shard, and gathering them every step would only cost bandwidth. The EMA is kept in pieces like
the weights it follows (`ldm.sharded_ema`), whole only in checkpoints.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from pytorch_lightning.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    StrategyRegistry,
)
from torch import nn

from ldm import sharded_ema
from ldm.models.diffusion.conditioning import DiffusionWrapper
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
from ldm.util import ConfigError

# The FSDP units, and what activation checkpointing wraps. Not the ResBlocks and
# SpatialTransformers themselves: TimestepEmbedSequential hands each its inputs by isinstance,
# which a wrapper (FSDP's or the checkpoint's) around them would no longer pass.
UNET_BLOCKS = {TimestepEmbedSequential}
# The FSDP units: those blocks, and the UNet's rest (time embedding, out) in the wrapper's unit,
# so that nothing the EMA follows is the root's: Lightning runs validation_step inside the root's
# forward, where the root's own parameters are gathered and the EMA's pieces could not swap in.
FSDP_UNITS = {*UNET_BLOCKS, DiffusionWrapper}
FROZEN_STAGES = ("first_stage_model", "cond_stage_model")  # kept whole, outside the sharding
# DDP names, with their DistributedDataParallel arguments. None broadcasts buffers before each
# forward: the schedule's are constant, and the EMA's (a whole UNet) follow weights that are
# equal on every rank, so each rank's EMA stays equal without a copy per step.
DDP_NAMES = {"ddp": {}, "ddp_find_unused_parameters_true": {"find_unused_parameters": True}}
DEEPSPEED_NAMES = ("deepspeed_stage_2", "deepspeed_stage_2_offload")
# `lightning.fsdp` in a config: the options of `--strategy fsdp`, with their defaults.
FSDP_OPTIONS = {
    "activation_checkpointing": False,  # recompute each UNet block's activations in backward
    "state_dict_type": "full",  # full: one file on rank 0; sharded: a <name>.ckpt/ directory
    "sharding_strategy": "FULL_SHARD",  # or SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD
    "cpu_offload": False,  # keep the sharded parameters on the host between uses
}
STATE_DICT_TYPES = ("full", "sharded")
# Strategies whose forward gathers the weights from every rank: rank 0 cannot run it alone.
SHARDED = (FSDPStrategy, DeepSpeedStrategy)


def refuse_rank_zero_sampling(strategy: object, who: str, leave_out: str = "") -> None:
    """Before training, refuse a callback that samples on rank 0 alone under a SHARDED
    strategy (rank 0 would wait for the other ranks' shards at its first grid)."""
    if isinstance(strategy, SHARDED):
        raise ConfigError(
            f"{who} samples on rank 0 alone, which {type(strategy).__name__} (weights sharded "
            f"across ranks) cannot do: {leave_out}train with --strategy ddp"
        )


def make_strategy(
    name: str | None, model: nn.Module, *, world_size: int, options: Mapping | None = None
) -> object:
    """What the Trainer's `strategy` gets for `--strategy name` (or the config's), training
    `model` on `world_size` processes; `options` is the config's `lightning.fsdp`."""
    if options and name != "fsdp":
        raise ConfigError(
            f"lightning.fsdp is set, but the strategy is {name!r}: pass --strategy fsdp"
        )
    if name in (None, "auto"):
        return DDPStrategy(broadcast_buffers=False) if world_size > 1 else "auto"
    if not isinstance(name, str):
        return name  # a Strategy object from Python: the caller's own
    if name in DDP_NAMES:
        return DDPStrategy(broadcast_buffers=False, **DDP_NAMES[name])
    if name == "fsdp":
        return fsdp_strategy(model, {**FSDP_OPTIONS, **fsdp_options(options)})
    if name in DEEPSPEED_NAMES:
        check_deepspeed(name)
        return name
    if name.startswith("fsdp") and name in StrategyRegistry:
        raise ConfigError(
            f"--strategy {name}: use --strategy fsdp (wrapped at the UNet's blocks) with its "
            f"options under lightning.fsdp: {', '.join(FSDP_OPTIONS)}"
        )
    if name not in StrategyRegistry:
        known = sorted(
            {*DDP_NAMES, "fsdp", *DEEPSPEED_NAMES, *StrategyRegistry.available_strategies()}
        )
        raise ConfigError(
            f"--strategy {name!r}: not a strategy; expected one of {', '.join(known)}"
        )
    return name


def fsdp_options(options: Mapping | None) -> dict:
    """The config's `lightning.fsdp`, checked: known keys, a known state_dict_type."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(FSDP_OPTIONS))
    if unknown:
        raise ConfigError(f"lightning.fsdp: unknown {unknown}; expected {list(FSDP_OPTIONS)}")
    if options.get("state_dict_type", "full") not in STATE_DICT_TYPES:
        raise ConfigError(
            f"lightning.fsdp.state_dict_type {options['state_dict_type']!r}: expected full or "
            "sharded"
        )
    return options


def fsdp_strategy(model: nn.Module, options: dict) -> FSDPStrategy:
    """Lightning's FSDPStrategy with our policy: units at the UNet's blocks, frozen stages left
    out, activation checkpointing of those blocks on request. `--precision` sets the mixed
    precision (Lightning's FSDPPrecision casts the sharded parameters and gradients)."""
    check_ema(model)
    return UNetFSDPStrategy(
        auto_wrap_policy=FSDP_UNITS,
        activation_checkpointing_policy=UNET_BLOCKS
        if options["activation_checkpointing"]
        else None,
        ignored_modules=frozen_stages(model),
        state_dict_type=options["state_dict_type"],
        sharding_strategy=options["sharding_strategy"],
        cpu_offload=options["cpu_offload"],
        use_orig_params=True,  # parameter names as built: the optimizer's groups, LoRA, logs
    )


def frozen_stages(model: nn.Module) -> list[nn.Module]:
    """The model's first stage and text encoder where nothing in them trains: FSDP neither
    shards nor all-reduces an ignored module, so a trainable one has to be sharded."""
    stages = [getattr(model, name, None) for name in FROZEN_STAGES]
    return [
        stage
        for stage in stages
        if isinstance(stage, nn.Module) and not any(p.requires_grad for p in stage.parameters())
    ]


def check_ema(model: nn.Module) -> None:
    """Refuse an EMA of LoRA adapters under FSDP: the adapters are the root unit's parameters
    (the UNet's blocks call them from forward hooks), gathered whole while Lightning runs
    validation_step in the root's forward, so the EMA's pieces cannot be swapped in there."""
    if getattr(model, "use_ema", False) and getattr(model, "lora", None) is not None:
        raise ConfigError(
            "--strategy fsdp: model.params.use_ema with lora_config is not supported (the "
            "adapters' EMA cannot follow FSDP's root unit); train LoRA with --strategy ddp "
            "(adapters are small: sharding them saves little), or set model.params.use_ema=false"
        )


def check_deepspeed(name: str) -> None:
    """DeepSpeed needs its package and CUDA; name what is missing."""
    missing = []
    if importlib.util.find_spec("deepspeed") is None:
        missing.append("the deepspeed package (pip install deepspeed)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device (DeepSpeed's ZeRO runs on GPUs only)")
    if missing:
        raise ConfigError(f"--strategy {name} needs {' and '.join(missing)}")


class UNetFSDPStrategy(FSDPStrategy):
    """FSDPStrategy that puts the ignored (frozen) modules on the device, which FSDP leaves
    where they are, that keeps the EMA in pieces like the weights (whole in its checkpoints, as
    under DDP), and that also runs on CPU processes (gloo), as torch's FSDP does: Lightning
    passes it `device_id=root_device.index`, None on the CPU, which FSDP reads as "find an
    accelerator". On the CPU it is for tests and debugging, not for speed."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        for module in self.kwargs.get("ignored_modules", ()):
            module.to(self.root_device)
        ema = model.model_ema if getattr(model, "use_ema", False) else None
        whole = ema.release_shadows() if ema is not None else None  # not onto the device
        wrapped = self._wrap(model)
        if ema is not None:
            sharded_ema.scatter(wrapped, ema, model.ema_target(), whole)
        return wrapped

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from lightning_fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def ema(self) -> tuple | None:
        """(LitEma, the module it follows) when the model keeps an EMA, else None."""
        module = self.lightning_module
        if not getattr(module, "use_ema", False):
            return None
        return module.model_ema, module.ema_target()

    def lightning_module_state_dict(self) -> dict:
        """FSDP's state dict, with the EMA's whole shadow weights (`model_ema.*`) gathered in."""
        state = super().lightning_module_state_dict()
        if self.ema() is not None:
            rank0_only = self._state_dict_type == "full" and self.world_size > 1
            state.update(sharded_ema.gather(self.model, *self.ema(), rank0_only=rank0_only))
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Lightning's FSDP loading, then this rank's pieces of the checkpoint's EMA: from the
        file's `model_ema.*` (held back by LitEma while loading) or the sharded directory's."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        if self.ema() is not None:
            ema, target = self.ema()
            path = Path(self.broadcast(checkpoint_path))
            whole = sharded_ema.read_sharded_shadows(path, ema) if path.is_dir() else ema.pending
            sharded_ema.scatter(self.model, ema, target, whole)
        return checkpoint
