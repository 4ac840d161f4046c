"""DreamBooth: fixed-caption folders, a weighted mix of sources, per-item loss weights (prior
preservation), class images made once by the base model, and a LoRA DreamBooth run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_config
from omegaconf import OmegaConf
from PIL import Image
from test_run_guarantees import TINY, only_logdir, train

from ldm.checkpoint import save_checkpoint
from ldm.data.folder import ImageCaptionFolder
from ldm.data.mix import DataMix
from ldm.models.diffusion import schedule
from ldm.models.diffusion.loss import DiffusionLoss
from ldm.util import ConfigError, instantiate_from_config
from scripts import class_images


def image_folder(root: Path, n: int, captions: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(len(str(root)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"caption {i}")
    return root


def folder_config(root: Path, **params) -> dict:
    return {
        "target": "ldm.data.folder.ImageCaptionFolder",
        "params": {"root": str(root), "size": 32, **params},
    }


def test_per_item_loss_weights_follow_the_closed_form():
    loss_fn = DiffusionLoss(schedule.make_beta_schedule("linear", 1000, 1e-4, 2e-2))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 900])

    def predict(x_t, t, self_cond):
        return 0.5 * x_t

    per_item = [
        loss_fn(predict, x0[i : i + 1], t[i : i + 1], noise[i : i + 1])[0] for i in range(3)
    ]
    weights = torch.tensor([1.0, 0.0, 2.5])
    weighted, logs = loss_fn(predict, x0, t, noise, weights=weights)
    torch.testing.assert_close(
        weighted, sum(w * one for w, one in zip(weights, per_item, strict=True)) / 3
    )
    torch.testing.assert_close(loss_fn(predict, x0, t, noise)[0], sum(per_item) / 3)
    torch.testing.assert_close(
        logs["train/loss_simple"], loss_fn(predict, x0, t, noise)[1]["train/loss_simple"]
    )


def test_a_mix_repeats_its_sources_and_weighs_their_items(tmp_path):
    instance = image_folder(tmp_path / "instance", 3)
    prior = image_folder(tmp_path / "class", 5, captions=True)
    mix = DataMix(
        [
            {"dataset": folder_config(instance, caption="a photo of sks shape"), "repeats": 4},
            {"dataset": folder_config(prior), "caption_prefix": "class: ", "loss_weight": 0.5},
        ]
    )
    assert len(mix) == 3 * 4 + 5
    items = [mix[i] for i in range(len(mix))]
    assert [it["caption"] for it in items[:12]] == ["a photo of sks shape"] * 12
    assert [it["loss_weight"] for it in items] == [1.0] * 12 + [0.5] * 5
    assert items[12]["caption"] == "class: caption 0"
    assert np.array_equal(items[0]["image"], items[3]["image"])  # the repeat of item 0
    with pytest.raises(IndexError):
        mix[len(mix)]


def test_dreambooth_data_mistakes_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images in .*empty"):
        DataMix([{"dataset": folder_config(empty, caption="a photo of sks dog")}])
    uncaptioned = image_folder(tmp_path / "class", 2)
    with pytest.raises(FileNotFoundError, match="caption:"):  # a class folder without its prompt
        ImageCaptionFolder(uncaptioned, size=32)
    cases = [
        ([], "sources is empty"),
        ([{"dataset": folder_config(uncaptioned, caption="x"), "repeat": 2}], "unknown keys"),
        ([{"dataset": folder_config(uncaptioned, caption="x"), "repeats": 0}], "repeats 0"),
        (
            [{"dataset": folder_config(uncaptioned, caption="x"), "loss_weight": -1}],
            "loss_weight -1",
        ),
        ([{"repeats": 2}], "sources\\[0\\]"),
    ]
    for sources, message in cases:
        with pytest.raises(ConfigError, match=message):
            DataMix(sources)


def test_a_batchs_loss_weights_reach_the_models_loss():
    config = load_config("tiny/txt2img.yaml").model
    model = instantiate_from_config(config).eval()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a", "b"]}

    def loss(**extra):
        torch.manual_seed(0)
        return model.shared_step({**batch, **extra})[0]

    assert loss(loss_weight=torch.zeros(2)) == 0
    torch.testing.assert_close(loss(loss_weight=torch.full((2,), 3.0)), 3 * loss())


def test_class_images_are_made_once_and_reused(tmp_path):
    base = tmp_path / "base.safetensors"
    save_checkpoint(
        instantiate_from_config(load_config("tiny/txt2img.yaml").model).state_dict(), base
    )
    folder = tmp_path / "class" / "samples"

    def make(n: int) -> dict:
        args = ["--ckpt", str(base), "--config", str(TINY), "--prompt", "a red circle"]
        args += ["--outdir", str(tmp_path / "class"), "--ddim_steps", "2", "--n_images", str(n)]
        return class_images.main([*args, "--precision", "full", "--device", "cpu"])

    first = make(3)
    assert first["made"] == 3 and first["had"] == 0
    files = sorted(folder.glob("*.png"))
    assert len(files) >= 3
    stamps = [os.stat(f).st_mtime_ns for f in files]
    again = make(3)
    assert again["made"] == 0 and again["had"] == len(files)
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # reused, not redrawn
    more = make(len(files) + 2)
    assert more["made"] == 2 and len(list(folder.glob("*.png"))) >= len(files) + 2


@pytest.mark.slow
def test_a_lora_dreambooth_run_with_prior_preservation_trains(tmp_path):
    instance = image_folder(tmp_path / "instance", 4)
    prior = image_folder(tmp_path / "class", 4)
    data = {
        "target": "ldm.data.DataModuleFromConfig",
        "params": {
            "batch_size": 4,
            "num_workers": 0,
            "train": {
                "target": "ldm.data.mix.DataMix",
                "params": {
                    "sources": [
                        {"dataset": folder_config(instance, caption="a sks shape"), "repeats": 2},
                        {"dataset": folder_config(prior, caption="a shape"), "loss_weight": 1.0},
                    ]
                },
            },
        },
    }
    config = OmegaConf.load(TINY)
    config.data = data
    config.model.params.lora_config = {"unet": {"rank": 4}}
    path = tmp_path / "dreambooth.yaml"
    OmegaConf.save(config, path)
    trainer = train(tmp_path / "logs", "--max_steps", "3", base=path)
    assert trainer.global_step == 3
    assert (only_logdir(tmp_path / "logs") / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_the_dreambooth_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from scripts import demo_dreambooth

    base = train(
        tmp_path / "base",
        "--max_steps",
        "2",
        "data.params.batch_size=4",
        "data.params.num_workers=0",
        "lightning.trainer.limit_val_batches=1",
    )
    result = demo_dreambooth.main(
        [
            "--base_run",
            str(base.default_root_dir),
            "--outdir",
            str(tmp_path / "out"),
            "--logdir",
            str(tmp_path / "logs"),
        ]
        + [
            "--steps",
            "2",
            "--instances",
            "4",
            "--class_per_prompt",
            "1",
            "--n_per_prompt",
            "1",
            "--eval_steps",
            "2",
        ]
    )
    for name in ("base", "with-prior", "without-prior"):
        assert set(result[name]["new_concept"]) == {"color", "shape", "background", "all"}
        assert (tmp_path / "out" / f"{name}-demo-prompts.png").is_file()
        assert (tmp_path / "out" / f"{name}-new-concept.png").is_file()
    assert len(list((tmp_path / "out" / "class").glob("*.png"))) == 24  # one per demo prompt
    assert len(list((tmp_path / "out" / "instance").glob("*.txt"))) == 4
    assert "diamond" in (tmp_path / "out" / "instance" / "000.txt").read_text()
    assert set(result["autoencoder_ceiling"]) == {"color", "shape", "background", "all"}


def test_a_weighted_mix_is_not_cached_as_its_weights_would_be_lost(tmp_path):
    from types import SimpleNamespace

    from ldm.data.cache import LatentCache

    instance = image_folder(tmp_path / "instance", 2)
    prior = image_folder(tmp_path / "class", 2)
    mix = DataMix(
        [
            {"dataset": folder_config(instance, caption="a sks shape")},
            {"dataset": folder_config(prior, caption="a shape"), "loss_weight": 0.5},
        ]
    )
    data = SimpleNamespace(datasets={"train": mix}, dataset_configs={"train": {}})
    with pytest.raises(ConfigError, match="keeps no loss weights"):
        LatentCache(str(tmp_path / "cache")).cached(None, None, data, "train")
