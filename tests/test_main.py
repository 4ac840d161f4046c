"""main.py end to end on the tiny configs: train, resume, fine-tune, overrides, failures."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_ddp
from pytorch_lightning.utilities.exceptions import SIGTERMException

import main
from ldm.callbacks import AtomicCheckpointIO
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
    base = ["--base", str(ROOT / "configs/tiny/txt2img.yaml"), "-l", str(tmp_path / "logs")]
    result = run_ddp(tmp_path, *base, "--max_steps", "2", *SMALL)
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
        "lightning.logger.params.offline=true",
        "lightning.logger.params.project=ldm-test",
        "lightning.callbacks.image_logger.params.batch_frequency=1",
    ]
    trainer = run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "1", *wandb)
    (logdir,) = logdirs(tmp_path)
    assert list(logdir.glob("wandb/offline-run-*"))
    assert list((logdir / "images" / "train").glob("samples_cfg3_*.png"))
    trainer.logger.experiment.finish()


# ---------------------------------------------------------------- unreadable and pickled files


def damaged_copy(state_dict: dict, path: Path) -> Path:
    """`state_dict` saved at `path`, then cut in half as an interrupted copy leaves it."""
    save_checkpoint(state_dict, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def exits_naming(argv: list[str], *fragments: str) -> None:
    """main.py's command line exits non-zero with one line that holds every fragment."""
    with pytest.raises(SystemExit) as info:
        main.cli([*argv, *SMALL])
    message = str(info.value.code)
    assert info.value.code not in (0, None) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def pickled(state_dict: dict, path: Path) -> Path:
    """A CompVis-era checkpoint: the tensors beside a pickled Python object."""
    torch.save({"state_dict": state_dict, "hparams": argparse.Namespace(lr=1e-4)}, path)
    return path


TINY = ["--base", str(ROOT / "configs" / "tiny" / "txt2img.yaml")]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_an_unreadable_finetune_file_is_named(tmp_path, suffix):
    path = damaged_copy({"w": torch.randn(64, 64)}, tmp_path / f"model{suffix}")
    argv = [*TINY, "-t", "-l", str(tmp_path / "logs"), "--finetune_from", str(path)]
    exits_naming(argv, str(path), "truncated or corrupt")


def test_an_unreadable_resume_checkpoint_is_named(tmp_path):
    logdir = tmp_path / "logs" / "run"
    (logdir / "configs").mkdir(parents=True)
    (logdir / "configs" / "0-project.yaml").write_text((ROOT / TINY[1]).read_text())
    last = damaged_copy({"w": torch.randn(64, 64)}, logdir / "checkpoints" / "last.ckpt")
    exits_naming(["-r", str(logdir), "-t", "--max_steps", "1"], str(last), "truncated or corrupt")


def test_the_command_line_reports_a_bad_file_in_one_line(tmp_path):
    path = damaged_copy({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    command = [sys.executable, str(ROOT / "main.py"), *TINY, "-t", "-l", str(tmp_path / "logs")]
    result = subprocess.run(
        [*command, "--finetune_from", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("main.py: ") and str(path) in last_line
    assert "truncated or corrupt" in last_line


def test_a_pickled_finetune_file_needs_the_flag(tmp_path):
    source = run(tmp_path / "a", "txt2img.yaml", "-t", "--max_steps", "1").lightning_module
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("model_ema.")}
    path = pickled(weights, tmp_path / "compvis.ckpt")
    argv = [*TINY, "-t", "--max_steps", "1", "--finetune_from", str(path)]
    exits_naming([*argv, "-l", str(tmp_path / "b")], str(path), "--unsafe_pickle")
    frozen_lr = ["model.base_learning_rate=0", "--unsafe_pickle"]
    trainer = run(tmp_path / "c", "txt2img.yaml", *argv[2:], *frozen_lr)
    for key, value in weights.items():
        assert torch.equal(trainer.lightning_module.state_dict()[key], value), key


def test_a_pickled_resume_checkpoint_needs_the_flag_and_checkpoints_are_shared(tmp_path):
    previous = os.umask(0o022)
    try:
        run(tmp_path, "txt2img.yaml", "-t", "--max_steps", "1")
    finally:
        os.umask(previous)
    (logdir,) = logdirs(tmp_path)
    last = logdir / "checkpoints" / "last.ckpt"
    assert stat.S_IMODE(last.stat().st_mode) == 0o644  # as a plain file under umask 022
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hparams"] = argparse.Namespace(lr=1e-4)
    torch.save(checkpoint, last)
    resume = ["-r", str(logdir), "-t", "--max_steps", "2"]
    exits_naming(resume, str(last), "--unsafe_pickle")
    assert main.cli([*resume, "--unsafe_pickle", *SMALL]).global_step == 2
