"""The README's "What a run guarantees", run for real through main.py: exact resume (the run's
seed, random augmentation in DataLoader workers, streamed data), a NaN loss stopping the run
with a good `last.ckpt`, and under 2-process DDP on gloo: one RNG stream per rank, saved and
resumed per rank, and a NaN on one rank stopping every rank with the same message."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT, run_ddp
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import main
from ldm.callbacks import RNGStateCallback, parameters_are_finite
from ldm.util import ConfigError, instantiate_from_config

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
SMALL = [
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
]
EVERY_STEP = "lightning.modelcheckpoint.params.every_n_train_steps=1"
NAN_MESSAGE = re.compile(r"the training loss became .*?; stopping")


def train(logs: Path, *args: str, base: Path = TINY):
    return main.main(["--base", str(base), "-l", str(logs), "-t", "--no-test", *args])


def resume(logdir: Path, *args: str):
    return main.main(["-r", str(logdir), "-t", "--no-test", *args])


def only_logdir(logs: Path) -> Path:
    (logdir,) = sorted(logs.iterdir())
    return logdir


def last_checkpoint(logdir: Path) -> dict:
    return torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_state(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)


def data_config(train: dict, num_workers: int) -> DictConfig:
    """The tiny txt2img config with only a `train` data set."""
    return OmegaConf.create(
        {
            "target": "ldm.data.DataModuleFromConfig",
            "params": {"batch_size": 4, "num_workers": num_workers, "train": train},
        }
    )


def tiny_config_with_data(path: Path, data: DictConfig) -> Path:
    config = OmegaConf.load(TINY)
    config.data = data
    OmegaConf.save(config, path)
    return path


def write_image_folder(root: Path, n: int) -> Path:
    """`n` noise images of 40 × 36 px (so crops and flips change them) with captions."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    return root


# ---------------------------------------------------------------- one process


def test_the_runs_seed_comes_from_s_then_the_config_then_the_default(caplog):
    saved = OmegaConf.create({"seed": 7})
    assert main.run_seed(None, OmegaConf.create(), resuming=False) == main.DEFAULT_SEED
    assert main.run_seed(5, saved, resuming=False) == 5  # a new run: -s over the base config
    assert main.run_seed(None, saved, resuming=True) == main.run_seed(7, saved, True) == 7
    with pytest.raises(ConfigError, match="started with seed 7.*override seed=5"):
        main.run_seed(5, saved, resuming=True)
    with caplog.at_level(logging.WARNING, logger="main"):
        assert main.run_seed(None, OmegaConf.create(), resuming=True) == main.DEFAULT_SEED
    assert "record no seed" in caplog.text


def test_rng_states_of_older_checkpoints_and_missing_ranks(caplog):
    callback = RNGStateCallback(seed=3)
    state = callback.state_dict()
    assert state["seed"] == 3 and len(state["ranks"]) == 1
    expected = torch.rand(3)
    callback.load_state_dict(state["ranks"][0])  # the layout before per-rank states
    assert torch.equal(torch.rand(3), expected)
    callback.rank, callback.world_size = 1, 2
    with caplog.at_level(logging.WARNING, logger="ldm.callbacks"):
        callback.load_state_dict(state)
    assert "states of 1 ranks: rank 1 keeps a fresh stream" in caplog.text


@pytest.mark.slow
def test_resume_takes_the_runs_seed_and_refuses_another(tmp_path):
    whole = train(tmp_path / "whole", "-s", "7", "--max_steps", "4", *SMALL)
    train(tmp_path / "parts", "-s", "7", "--max_steps", "2", *SMALL)
    logdir = only_logdir(tmp_path / "parts")
    resumed = resume(logdir, "--max_steps", "4")  # no -s: the run's seed, 7
    assert resumed.global_step == 4
    assert_same_state(resumed.lightning_module.state_dict(), whole.lightning_module.state_dict())
    with pytest.raises(ConfigError, match="seed 7"):
        resume(logdir, "-s", "5", "--max_steps", "6")


@pytest.mark.slow
def test_resume_with_random_crops_flips_and_workers_is_exact(tmp_path):
    """A fine-tuning-style folder (random crops, flips, 2 workers): 3 + 3 steps equal 6."""
    root = write_image_folder(tmp_path / "images", 16)  # 4 batches an epoch: resume mid-epoch
    params = {"root": str(root), "size": 32, "crop": "random", "flip_p": 0.5}
    folder = {"target": "ldm.data.folder.ImageCaptionFolder", "params": params}
    base = tiny_config_with_data(tmp_path / "folder.yaml", data_config(folder, num_workers=2))
    whole = train(tmp_path / "whole", "--max_steps", "6", base=base)
    train(tmp_path / "parts", "--max_steps", "3", base=base)
    resumed = resume(only_logdir(tmp_path / "parts"), "--max_steps", "6")
    assert resumed.global_step == 6
    assert_same_state(resumed.lightning_module.state_dict(), whole.lightning_module.state_dict())


def write_shards(root: Path, shards: int, per_shard: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for i in range(per_shard):
                image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))
                path = root / "tmp.png"
                image.save(path)
                sink.write({"__key__": f"s{s}i{i}", "png": path.read_bytes(), "txt": f"{s} {i}"})
    (root / "tmp.png").unlink()
    return root


@pytest.mark.slow
def test_resuming_mid_epoch_on_streamed_data_says_what_is_repeated(tmp_path, caplog):
    root = write_shards(tmp_path / "shards", shards=2, per_shard=8)  # 4 batches a pass
    shards = {
        "target": "ldm.data.shards.WebDatasetShards",
        "params": {"urls": str(root), "size": 32},
    }
    base = tiny_config_with_data(tmp_path / "shards.yaml", data_config(shards, num_workers=0))
    with caplog.at_level(logging.WARNING, logger="ldm.data.datamodule"):
        train(tmp_path / "logs", "--max_steps", "2", base=base)
        assert "mid-epoch" not in caplog.text
        resume(only_logdir(tmp_path / "logs"), "--max_steps", "3")
    assert "resuming mid-epoch" in caplog.text
    assert "its first 2 batches" in caplog.text and "WebDatasetShards" in caplog.text


@pytest.mark.slow
def test_nan_loss_stops_the_run_keeping_the_last_finite_checkpoint(tmp_path):
    """A NaN in the batch of step 2: the run stops naming the step, `last.ckpt` holds step 2's
    start (finite), and a resume from it (the bad data fixed) trains on."""
    nan = [f"lightning.callbacks.nan.{k}" for k in ("target=probes.NaNBatch", "params.step=2")]
    with pytest.raises(FloatingPointError, match="at global step 2 "):
        train(tmp_path / "logs", "--max_steps", "5", EVERY_STEP, *nan, *SMALL)
    logdir = only_logdir(tmp_path / "logs")
    checkpoint = last_checkpoint(logdir)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    config = OmegaConf.load(next((logdir / "configs").glob("*-project.yaml")))
    model = instantiate_from_config(config.model)
    model.load_state_dict(checkpoint["state_dict"])
    trainer = resume(logdir, "--max_steps", "4", "lightning.callbacks.nan.params.step=-1")
    assert trainer.global_step == 4 and parameters_are_finite(trainer.lightning_module)


# ---------------------------------------------------------------- two processes (DDP, gloo)


def read_probes(folder: Path, start: int) -> list[dict]:
    """Each rank's RNGProbe record of the fit that started at global step `start`."""
    paths = [folder / f"probe-rank{rank}-from{start}.json" for rank in (0, 1)]
    return [json.loads(path.read_text()) for path in paths]


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_noise_and_resume_their_own_streams(tmp_path):
    probe = ["lightning.callbacks.probe.target=probes.RNGProbe", *SMALL]
    for name, steps in (("whole", "4"), ("parts", "2")):
        probes = tmp_path / f"probes-{name}"
        where = [f"lightning.callbacks.probe.params.dir={probes}", "--max_steps", steps]
        result = run_ddp(tmp_path, "--base", str(TINY), "-l", str(tmp_path / name), *where, *probe)
        assert result.returncode == 0, result.stderr[-3000:]
    logdir = only_logdir(tmp_path / "parts")
    result = run_ddp(tmp_path, "-r", str(logdir), "--max_steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]

    whole = read_probes(tmp_path / "probes-whole", 0)
    first, resumed = (read_probes(tmp_path / "probes-parts", start) for start in (0, 2))
    for step in ("0", "1", "2", "3"):  # each rank draws its own timesteps and noise
        assert whole[0]["peeks"][step] != whole[1]["peeks"][step], step
    for rank in (0, 1):  # and goes on with its own stream after the resume
        assert {**first[rank]["peeks"], **resumed[rank]["peeks"]} == whole[rank]["peeks"], rank
    for moment in ("built", "start", "end"):  # while the weights are the same on every rank
        assert whole[0]["checksums"][moment] == whole[1]["checksums"][moment], moment
    assert whole[0]["logdir"] == whole[1]["logdir"] == str(only_logdir(tmp_path / "whole"))
    checkpoint = last_checkpoint(logdir)
    assert len(checkpoint["callbacks"]["RNGStateCallback"]["ranks"]) == 2
    reference = last_checkpoint(only_logdir(tmp_path / "whole"))
    assert checkpoint["global_step"] == reference["global_step"] == 4
    assert_same_state(checkpoint["state_dict"], reference["state_dict"])


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    nan = [
        "lightning.callbacks.nan.target=probes.NaNBatch",
        "lightning.callbacks.nan.params.step=2",
        "lightning.callbacks.nan.params.rank=1",
    ]
    result = run_ddp(
        tmp_path,
        "--base",
        str(TINY),
        "-l",
        str(tmp_path / "logs"),
        "--max_steps",
        "5",
        EVERY_STEP,
        *nan,
        *SMALL,
        timeout=300,
    )
    assert result.returncode != 0
    messages = NAN_MESSAGE.findall(result.stderr)
    assert len(messages) == 2 and len(set(messages)) == 1, result.stderr[-3000:]
    assert "on rank 1 of 2" in messages[0] and "at global step 2 " in messages[0]
    checkpoint = last_checkpoint(only_logdir(tmp_path / "logs"))
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
