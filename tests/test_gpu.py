"""The user's paths on CUDA: training in mixed precision, every sampler, img2img and export.

Marked `gpu`: skipped without a CUDA device. Run them with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm import inference
from ldm.checkpoint import read_state_dict, save_checkpoint
from ldm.data.synthetic import SyntheticShapes
from ldm.models.diffusion import sampling
from ldm.util import instantiate_from_config
from scripts import convert, img2img, txt2img

pytestmark = pytest.mark.gpu

CUDA = ["--device", "cuda", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1"]


def train(root: Path, precision: str, *extra: str) -> main.pl.Trainer:
    argv = [
        "--base",
        str(ROOT / "configs" / "tiny" / "txt2img.yaml"),
        "-t",
        "--no-test",
        "-l",
        str(root),
        "--accelerator",
        "gpu",
        "--devices",
        "1",
        "--max_steps",
        "2",
        "--precision",
        precision,
        "data.params.batch_size=4",
        "data.params.num_workers=0",
        "lightning.trainer.limit_val_batches=1",
        *extra,
    ]
    return main.main(argv)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-run")
    train(root, "bf16-mixed")
    (run,) = root.iterdir()
    return run


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_two_training_steps_in_mixed_precision(tmp_path, precision):
    trainer = train(tmp_path, precision)
    model = trainer.lightning_module
    assert trainer.global_step == 2 and model.device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.model_ema.num_updates.item() == 2


@pytest.mark.parametrize("sampler", sorted(sampling.SAMPLERS))
@pytest.mark.parametrize("precision", ["autocast", "full"])
def test_txt2img_with_each_sampler(logdir, tmp_path, sampler, precision):
    flags = ["--ckpt", str(logdir), "--outdir", str(tmp_path), "--sampler", sampler]
    images = txt2img.main([*flags, *CUDA, "--precision", precision])
    assert len(images) == 1 and images[0].shape == (2, 3, 32, 32)
    assert all(torch.isfinite(x).all() for x in images)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_img2img(logdir, tmp_path, strength):
    item = SyntheticShapes(size=32, length=1)[0]
    init = tmp_path / "init.png"
    Image.fromarray(((item["image"] + 1) * 127.5).round().astype(np.uint8)).save(init)
    flags = ["--ckpt", str(logdir), "--init-img", str(init), "--outdir", str(tmp_path / "out")]
    images = img2img.main([*flags, *CUDA, "--strength", str(strength)])
    assert images[0].shape == (2, 3, 32, 32) and torch.isfinite(images[0]).all()


def test_convert_a_cuda_run_and_sample_from_the_export(logdir, tmp_path):
    out = tmp_path / "model.safetensors"
    convert.main(["--ckpt", str(logdir), "--out", str(out), "--use_ema", "--half"])
    assert read_state_dict(out)["alphas_cumprod"].dtype == torch.float32  # the schedule stays
    config = next((logdir / "configs").glob("*-project.yaml"))
    model, _ = inference.load_model(out, [config], device="cuda")
    assert model.device.type == "cuda"
    flags = ["--ckpt", str(out), "--config", str(config), "--outdir", str(tmp_path / "s")]
    images = txt2img.main([*flags, *CUDA])
    assert torch.isfinite(images[0]).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_lora_fine_tune_trains_its_adapters_in_mixed_precision(tmp_path, precision):
    base = tmp_path / "base.safetensors"
    model = instantiate_from_config(
        OmegaConf.load(ROOT / "configs" / "tiny" / "txt2img.yaml").model
    )
    with torch.no_grad():
        for p in model.model.parameters():  # no zero-initialised layers: the adapters get grads
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(model.state_dict(), base)
    argv = ["--finetune_from", str(base), "model.params.lora_config.unet.rank=4"]
    trainer = train(
        tmp_path / "logs", precision, *argv, "model.params.lora_config.text_encoder.rank=2"
    )
    ups = [a.lora_up.weight for a in trainer.lightning_module.lora.values()]
    assert all(torch.isfinite(u).all() for u in ups) and any(u.abs().sum() > 0 for u in ups)
