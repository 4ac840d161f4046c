"""Sharded training (`--strategy fsdp`), its checkpoints and their conversion, and DDP without the
per-step buffer broadcast.

torch's FSDP runs on CPU processes with gloo; Lightning refuses `accelerator="cpu"` for its own
FSDPStrategy class only, and ldm.strategies.UNetFSDPStrategy passes FSDP the CPU device, so the
two-process runs here need no GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import ROOT, run_ddp
from PIL import Image
from pytorch_lightning.strategies import DDPStrategy

from ldm import sharded_ema, strategies
from ldm.checkpoint import (
    EMA_PREFIX,
    CheckpointError,
    ema_key,
    is_checkpoint,
    read_state_dict,
    run_files,
)
from ldm.modules.ema import LitEma, named_parameters
from ldm.util import ConfigError, instantiate_from_config
from scripts import convert, txt2img

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
SMALL = [
    "--max_steps",
    "2",
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
    "lightning.callbacks.image_logger=null",  # refused under FSDP: it samples on rank 0 alone
]
FSDP = ["--strategy", "fsdp"]
FAST = [
    "--ddim_steps",
    "3",
    "--precision",
    "full",
    "--device",
    "cpu",
    "--n_samples",
    "2",
    "--n_iter",
    "1",
]


@pytest.fixture(scope="module")
def tiny_model():
    from omegaconf import OmegaConf

    return instantiate_from_config(OmegaConf.load(TINY).model)


class EMAProbe(pl.Callback):
    """Writes, per rank, a checksum of the EMA and whether DDP broadcast buffers each forward."""

    def __init__(self, dir: str):
        super().__init__()
        self.dir = Path(dir)

    def on_train_end(self, trainer, pl_module) -> None:
        ema = pl_module.model_ema.tensors()
        record = {
            "ema": sum(float(v.double().sum()) for k, v in ema.items() if k != "num_updates"),
            "broadcast_buffers": trainer.strategy.model.broadcast_buffers,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------- strategy selection (fast)


def test_ddp_and_the_default_multi_device_strategy_skip_the_buffer_broadcast(tiny_model):
    for name in ("ddp", None, "auto"):
        strategy = strategies.make_strategy(name, tiny_model, world_size=2)
        assert isinstance(strategy, DDPStrategy)
        assert strategy._ddp_kwargs["broadcast_buffers"] is False
    unused = strategies.make_strategy("ddp_find_unused_parameters_true", tiny_model, world_size=2)
    assert unused._ddp_kwargs == {"broadcast_buffers": False, "find_unused_parameters": True}
    assert strategies.make_strategy(None, tiny_model, world_size=1) == "auto"


def test_fsdp_wraps_the_unet_blocks_and_leaves_the_frozen_stages_out(tiny_model):
    strategy = strategies.make_strategy("fsdp", tiny_model, world_size=2)
    checkpointed = strategies.make_strategy(
        "fsdp", tiny_model, world_size=2, options={"activation_checkpointing": True}
    )
    assert isinstance(strategy, strategies.UNetFSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    unet = tiny_model.model.diffusion_model
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    assert all(
        policy._module_classes and isinstance(b, tuple(policy._module_classes)) for b in blocks
    )
    ignored = strategy.kwargs["ignored_modules"]
    assert ignored == [tiny_model.first_stage_model, tiny_model.cond_stage_model]
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"
    assert strategy._activation_checkpointing_kwargs == {}
    assert "auto_wrap_policy" in checkpointed._activation_checkpointing_kwargs


def test_a_trainable_text_encoder_is_sharded_not_ignored(tiny_model):
    tiny_model.cond_stage_model.requires_grad_(True)
    try:
        assert strategies.frozen_stages(tiny_model) == [tiny_model.first_stage_model]
    finally:
        tiny_model.cond_stage_model.requires_grad_(False)


def test_fsdp_shards_each_block_in_one_process(tiny_model, tmp_path):
    """The wrap the strategy asks for, applied in a 1-process gloo group: each UNet block and the
    UNet's rest are FSDP units, the frozen stages keep their own (unflattened) parameters; the
    EMA's whole shadows go into pieces and come back whole, the weights untouched, and an EMA
    a checkpoint lacks is named."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    kwargs = strategies.make_strategy("fsdp", tiny_model, world_size=2).kwargs
    ema = LitEma(tiny_model.model)
    weights = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        whole = ema.release_shadows()
        wrapped = FullyShardedDataParallel(tiny_model, device_id=torch.device("cpu"), **kwargs)
        unet = wrapped.model.diffusion_model
        for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            assert isinstance(block, FullyShardedDataParallel)
        assert isinstance(wrapped.model, FullyShardedDataParallel)  # the UNet's rest
        frozen = dict(wrapped.first_stage_model.named_parameters())
        assert frozen["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
        assert not any(
            "_fsdp_wrapped_module" in n for n, _ in wrapped.cond_stage_model.named_parameters()
        )
        sharded_ema.scatter(wrapped, ema, wrapped.model, {k: v + 1 for k, v in whole.items()})
        gathered = sharded_ema.gather(wrapped, ema, wrapped.model, rank0_only=False)
        assert gathered.keys() == {EMA_PREFIX + k for k in whole}
        assert all(torch.equal(gathered[EMA_PREFIX + k], v + 1) for k, v in whole.items())
        with FullyShardedDataParallel.summon_full_params(wrapped):
            after = named_parameters(wrapped.model)
            assert all(torch.equal(after[n], w) for n, w in weights.items())
        with pytest.raises(CheckpointError, match="no EMA weights for 1 parameters"):
            sharded_ema.scatter(wrapped, ema, wrapped.model, dict(list(whole.items())[1:]))
    finally:
        dist.destroy_process_group()


def test_bad_strategies_and_options_are_named(tiny_model, monkeypatch):
    with pytest.raises(ConfigError, match="--strategy 'fsdpp': not a strategy; expected one of"):
        strategies.make_strategy("fsdpp", tiny_model, world_size=2)
    with pytest.raises(ConfigError, match="use --strategy fsdp .*lightning.fsdp"):
        strategies.make_strategy("fsdp_cpu_offload", tiny_model, world_size=2)
    with pytest.raises(ConfigError, match="lightning.fsdp is set, but the strategy is 'ddp'"):
        strategies.make_strategy("ddp", tiny_model, world_size=2, options={"cpu_offload": True})
    with pytest.raises(ConfigError, match=r"lightning.fsdp: unknown \['shard'\]"):
        strategies.make_strategy("fsdp", tiny_model, world_size=2, options={"shard": 1})
    with pytest.raises(ConfigError, match="state_dict_type 'half': expected full or sharded"):
        strategies.make_strategy(
            "fsdp", tiny_model, world_size=2, options={"state_dict_type": "half"}
        )
    monkeypatch.setattr(strategies.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        strategies.make_strategy("deepspeed_stage_2", tiny_model, world_size=2)


def test_the_image_logger_is_refused_under_fsdp_before_training_not_hung_at_its_step():
    from pytorch_lightning.strategies import FSDPStrategy

    from ldm.callbacks import ImageLogger

    logger = ImageLogger(batch_frequency=500)
    with pytest.raises(ConfigError, match="rank 0 alone.*image_logger=null.*--strategy ddp"):
        logger.setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")
    logger.setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")


def test_an_ema_of_lora_adapters_is_refused_under_fsdp_before_training(tmp_path):
    import main

    lora = ROOT / "configs" / "stable-diffusion" / "lora.yaml"
    args = ["--base", str(TINY), str(lora), "-t", "-l", str(tmp_path), *SMALL, *FSDP]
    with pytest.raises(ConfigError, match="use_ema with lora_config is not supported"):
        main.main([*args, "--accelerator", "cpu", "--devices", "2"])
    assert not list(tmp_path.glob("*/checkpoints/*"))


# ---------------------------------------------------------------- sharded checkpoints (fast)


def write_sharded(state_dict: dict, path: Path, step: int = 1) -> None:
    """A checkpoint dir as Lightning's FSDPStrategy(state_dict_type="sharded") writes one, made
    by torch.distributed.checkpoint in this process (one "shard")."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state_dict}, checkpoint_id=str(path), no_dist=True)
    torch.save({"global_step": step, "epoch": 0}, path / "meta.pt")


def test_a_sharded_checkpoint_converts_to_one_file_that_txt2img_samples(tiny_model, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    weight = "model.diffusion_model.out.2.weight"
    state[ema_key(weight)] = torch.full_like(state[weight], 0.25)  # an EMA that differs
    sharded = tmp_path / "last.ckpt"
    write_sharded(state, sharded)
    assert is_checkpoint(sharded) and run_files(sharded) == ([], sharded)
    out = tmp_path / "export.safetensors"
    summary = convert.main(
        ["--ckpt", str(sharded), "--config", str(TINY), "--use_ema", "--out", str(out)]
    )
    exported = read_state_dict(out)
    assert summary["checked"] == [str(TINY)]
    assert not any(k.startswith(EMA_PREFIX) for k in exported)
    assert set(exported) == {k for k in state if not k.startswith(EMA_PREFIX)}
    assert torch.equal(exported[weight], state[ema_key(weight)])
    samples = tmp_path / "samples"
    txt2img.main(["--ckpt", str(out), "--config", str(TINY), "--outdir", str(samples), *FAST])
    images = [np.asarray(Image.open(p)) for p in sorted((samples / "samples").glob("*.png"))]
    assert len(images) == 2 and all(i.shape == (32, 32, 3) and i.std() > 0 for i in images)


def test_a_broken_sharded_checkpoint_is_named(tmp_path):
    broken = tmp_path / "last.ckpt"
    broken.mkdir()
    torch.save({}, broken / "meta.pt")
    with pytest.raises(CheckpointError, match="not a readable sharded checkpoint"):
        read_state_dict(broken)


# ---------------------------------------------------------------- two processes (gloo)


def last_ckpt(root: Path) -> Path:
    (logdir,) = sorted(root.iterdir())
    return logdir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DDP run (EMA on, probed) and an FSDP run (EMA on, one full checkpoint file), 2 steps
    each on the same seed and data; the FSDP one then resumed (-r) to step 3 writing sharded
    checkpoints, and again to step 4 from the sharded directory, its EMA's pieces kept on the
    host (ema_device cpu) this time. {step: state dict} of FSDP."""
    root = tmp_path_factory.mktemp("runs")
    probe = ["lightning.callbacks.ema_probe.target=test_sharded.EMAProbe"]
    probe += [f"lightning.callbacks.ema_probe.params.dir={root / 'probe'}"]
    ddp = run_ddp(root, "--base", str(TINY), "-l", str(root / "ddp"), *SMALL, *probe)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = run_ddp(root, "--base", str(TINY), "-l", str(root / "fsdp"), *SMALL, *FSDP)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    last = last_ckpt(root / "fsdp")
    states = {2: read_state_dict(last)}
    for step, ema_device in ((3, "null"), (4, "cpu")):
        resume = ["-r", str(last.parent.parent), "--max_steps", str(step), *FSDP]
        resume += ["lightning.fsdp.state_dict_type=sharded"]
        resume += [f"model.params.ema_device={ema_device}"]
        resumed = run_ddp(root, *resume)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        states[step] = read_state_dict(last)
    return root, states


@pytest.mark.slow
def test_fsdp_parameters_and_ema_after_two_steps_equal_ddps(runs):
    root, fsdp = runs
    ddp = read_state_dict(last_ckpt(root / "ddp"))
    keys = [k for k in ddp if k.startswith(("model.", EMA_PREFIX))]
    assert {k for k in keys if k.startswith(EMA_PREFIX)} and set(keys) == {
        k for k in fsdp[2] if k.startswith(("model.", EMA_PREFIX))
    }
    for key in keys:
        torch.testing.assert_close(fsdp[2][key], ddp[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_the_fsdp_ema_resumes_from_a_full_file_and_from_a_sharded_directory(runs):
    """Each resumed step moves the EMA toward that step's weights by the closed form of the
    warm-up decay, min(0.9999, (1 + n) / (10 + n)) at update n: the shadow pieces every rank
    took back from the checkpoint (a file at step 2, a directory at step 3) were its own."""
    _, fsdp = runs
    weights = [k for k in fsdp[2] if k.startswith("model.") and ema_key(k) in fsdp[2]]
    assert weights
    for step in (3, 4):
        before, after = fsdp[step - 1], fsdp[step]
        assert int(after[EMA_PREFIX + "num_updates"]) == step
        weight = 1 - min(0.9999, (1 + step) / (10 + step))
        for key in weights:
            shadow = ema_key(key)
            expected = before[shadow] + weight * (after[key] - before[shadow])
            torch.testing.assert_close(after[shadow], expected, atol=1e-6, rtol=1e-5, msg=key)
            assert not torch.equal(after[shadow], before[shadow])


@pytest.mark.slow
def test_ddp_keeps_the_ema_equal_on_every_rank_without_broadcasting_it(runs):
    root, _ = runs
    records = [json.loads((root / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["broadcast_buffers"] for r in records] == [False, False]
    assert records[0]["ema"] == records[1]["ema"]


@pytest.mark.slow
def test_a_resumed_sharded_run_converts_and_samples(runs, tmp_path):
    root, fsdp = runs
    sharded = last_ckpt(root / "fsdp")
    assert (
        sharded.is_dir() and torch.load(sharded / "meta.pt", weights_only=False)["global_step"] == 4
    )
    out = tmp_path / "export.ckpt"
    convert.main(["--ckpt", str(sharded), "--use_ema", "--out", str(out)])  # the run's config
    exported = read_state_dict(out)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(exported[key], fsdp[4][ema_key(key)])
    samples = tmp_path / "samples"
    txt2img.main(["--ckpt", str(sharded.parent.parent), "--outdir", str(samples), *FAST])
    assert len(list((samples / "samples").glob("*.png"))) == 2
