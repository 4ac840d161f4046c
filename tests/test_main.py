"""main.py end to end on the tiny configs: train, resume, fine-tune, overrides, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from pytorch_lightning.utilities.exceptions import SIGTERMException

import main
from ldm.callbacks import AtomicCheckpointIO, NonFiniteLossGuard
from ldm.checkpoint import read_state_dict, save_checkpoint

SMALL = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
]


def run(tmp_path: Path, config: str, *args: str) -> object:
    argv = ["--base", str(ROOT / "configs" / "tiny" / config), "-l", str(tmp_path / "logs"), *args]
    return main.main([*argv, *SMALL])


def logdirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "logs").iterdir())


@pytest.mark.parametrize("config", ["autoencoder.yaml", "txt2img.yaml"])
def test_two_training_steps_write_the_run_layout(tmp_path, config):
    trainer = run(tmp_path, config, "-t", "--max_steps", "2", "--no-test")
    assert trainer.global_step == 2
    (logdir,) = logdirs(tmp_path)
    assert (logdir / "checkpoints" / "last.ckpt").is_file()
    configs = sorted(p.name for p in (logdir / "configs").iterdir())
    assert [c.split("-")[-1] for c in configs] == ["lightning.yaml", "project.yaml"]
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and "optimizer_states" in checkpoint


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    whole = run(tmp_path / "whole", "txt2img.yaml", "-t", "--max_steps", "4", "-s", "7")
    first = run(tmp_path / "parts", "txt2img.yaml", "-t", "--max_steps", "2", "-s", "7")
    (logdir,) = logdirs(tmp_path / "parts")
    assert first.global_step == 2
    resumed = main.main(["-r", str(logdir), "-t", "--max_steps", "4", "-s", "7", *SMALL])
    assert resumed.global_step == 4
    assert resumed.lightning_module.model_ema.num_updates.item() == 4
    ours, reference = resumed.lightning_module.state_dict(), whole.lightning_module.state_dict()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], msg=key)
    assert logdirs(tmp_path / "parts") == [logdir]  # the same log dir goes on


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path):
    trainer = run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "2", "--precision", "bf16-mixed")
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in trainer.lightning_module.parameters())


def test_config_overrides_apply_and_are_saved(tmp_path):
    trainer = run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "1", "model.params.timesteps=500")
    assert trainer.lightning_module.num_timesteps == 500
    (logdir,) = logdirs(tmp_path)
    project = next((logdir / "configs").glob("*-project.yaml")).read_text()
    assert "timesteps: 500" in project


def test_learning_rate_is_scaled_by_batch_and_accumulation(tmp_path):
    trainer = run(
        tmp_path, "txt2img.yaml", "-t", "--max_steps", "1", "--accumulate_grad_batches", "2"
    )
    assert trainer.lightning_module.learning_rate == pytest.approx(1e-4 * 4 * 2)
    trainer = run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "1", "--scale_lr", "false")
    assert trainer.lightning_module.learning_rate == pytest.approx(1e-4)


def test_finetune_from_an_original_layout_file(tmp_path):
    """Weights come from the file, the EMA restarts from them, the optimizer starts fresh."""
    source = run(tmp_path / "a", "txt2img.yaml", "-t", "--max_steps", "1").lightning_module
    path = tmp_path / "original-layout.safetensors"
    state_dict = {k: v for k, v in source.state_dict().items() if not k.startswith("model_ema.")}
    save_checkpoint(state_dict, path)
    frozen_lr = ["--finetune_from", str(path), "model.base_learning_rate=0"]
    trainer = run(tmp_path / "b", "txt2img.yaml", "-t", "--max_steps", "1", *frozen_lr)
    model = trainer.lightning_module
    for key, value in read_state_dict(path).items():
        assert torch.equal(model.state_dict()[key], value), key
    with model.ema_scope():
        for key, value in read_state_dict(path).items():
            assert torch.equal(model.state_dict()[key], value), key


def test_bad_command_lines_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        main.main(["--base", "nowhere.yaml", "-t"])
    with pytest.raises(FileNotFoundError, match="-r/--resume"):
        main.main(["-r", str(tmp_path / "no-run")])
    with pytest.raises(SystemExit, match="key=value"):
        run(tmp_path, "txt2img.yaml", "stray-argument")


def test_nan_loss_stops_the_run_naming_the_step():
    class Trainer:
        global_step, current_epoch = 17, 2

    with pytest.raises(FloatingPointError, match="global step 17"):
        NonFiniteLossGuard().on_train_batch_end(
            Trainer(), None, {"loss": torch.tensor(float("nan"))}, None, 3
        )
    NonFiniteLossGuard().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.0)}, None, 3)


def test_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)

    def crash_half_way(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("signal", [KeyboardInterrupt, SIGTERMException], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_last_ckpt_for_resume(tmp_path, monkeypatch, signal):
    from ldm.models.diffusion.ddpm import LatentDiffusion

    original = LatentDiffusion.training_step

    def interrupt_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise signal
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LatentDiffusion, "training_step", interrupt_at_step_2)
    with pytest.raises(SystemExit):
        run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "5")
    (logdir,) = logdirs(tmp_path)
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    command = [
        sys.executable, str(ROOT / "main.py"), "--base", str(ROOT / "configs/tiny/txt2img.yaml"),
        "-t", "-l", str(tmp_path / "logs"), "--max_steps", "2", "--accelerator", "cpu",
        "--devices", "2", "--strategy", "ddp", *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (logdir,) = logdirs(tmp_path)
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2


@pytest.mark.slow
def test_wandb_logs_offline_with_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb = [
        "lightning.logger.target=pytorch_lightning.loggers.WandbLogger",
        "lightning.logger.params.offline=true", "lightning.logger.params.project=ldm-test",
        "lightning.callbacks.image_logger.params.batch_frequency=1",
    ]  # fmt: skip
    trainer = run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "1", *wandb)
    (logdir,) = logdirs(tmp_path)
    assert list(logdir.glob("wandb/offline-run-*"))
    assert list((logdir / "images" / "train").glob("samples_cfg3_*.png"))
    trainer.logger.experiment.finish()
