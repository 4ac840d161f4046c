"""Caption augmentation, masked loss, and the clear word on data that is wrong."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from ldm.callbacks import DataReport
from ldm.data import DataModuleFromConfig, ImageCaptionFolder, WebDatasetShards
from ldm.data.captions import CaptionOptions
from ldm.models.diffusion import schedule
from ldm.models.diffusion.loss import DiffusionLoss
from ldm.util import ConfigError, instantiate_from_config

TAGS = "sks, dog, grass, sunny, red collar, park"


# ---------------------------------------------------------------- captions


def test_tag_shuffle_keeps_the_first_tags_and_moves_the_rest():
    options = CaptionOptions(shuffle_tags=True, keep_tags=2)
    np.random.seed(0)
    outputs = {options(TAGS) for _ in range(50)}
    assert len(outputs) > 10  # 4! = 24 orders of the rest
    for caption in outputs:
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(TAGS.split(", "))


def test_tag_dropout_never_drops_kept_tags_and_may_empty_a_caption():
    np.random.seed(0)
    kept = CaptionOptions(tag_dropout=0.5, keep_tags=1)
    counts = [len(kept(TAGS).split(", ")) for _ in range(400)]
    assert all(kept(TAGS).startswith("sks") for _ in range(20))
    assert 1 in counts and 6 in counts and abs(np.mean(counts) - 3.5) < 0.2  # 1 + 5 · 0.5
    assert CaptionOptions(tag_dropout=1.0)(TAGS) == ""


def test_a_trigger_word_goes_first_and_defaults_change_nothing():
    assert CaptionOptions(trigger="ohwx")("a man, smiling") == "ohwx, a man, smiling"
    assert CaptionOptions(trigger="ohwx", tag_dropout=1.0)("a man") == "ohwx"
    assert CaptionOptions()("a photo of a dog,  by the sea") == "a photo of a dog,  by the sea"


@pytest.mark.parametrize(
    ("captions", "match"),
    [
        ({"keep_tags": -1}, "keep_tags: expected an int ≥ 0"),
        ({"tag_dropout": 1.5}, "tag_dropout: expected a probability"),
        ({"shuffle": True}, "unknown keys \\['shuffle'\\]"),
    ],
)
def test_bad_caption_options_are_named(captions, match):
    with pytest.raises(ConfigError, match=match):
        CaptionOptions.parse(captions)


def write_images(root: Path, n: int, caption: str = TAGS, size=(32, 32)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


def test_folder_captions_are_augmented_per_epoch_and_empty_ones_counted(tmp_path, caplog):
    root = write_images(tmp_path / "images", 4)
    params = {"root": str(root), "size": 32, "captions": {"shuffle_tags": True, "keep_tags": 1}}
    train = {"target": "ldm.data.folder.ImageCaptionFolder", "params": params}
    loader = DataModuleFromConfig(batch_size=2, train=train, num_workers=0).train_dataloader()
    epochs = [[c for batch in loader for c in batch["caption"]] for _ in range(2)]
    assert epochs[0] != epochs[1] and all(c.startswith("sks, ") for c in epochs[0] + epochs[1])
    params["captions"] = {"tag_dropout": 1.0}
    loader = DataModuleFromConfig(batch_size=2, train=train, num_workers=0).train_dataloader()
    report = DataReport()
    for batch in loader:
        assert list(batch["caption"]) == ["", ""]
        report.on_train_batch_end(None, None, None, batch, 0)

    class Trainer:
        current_epoch = 0

    with caplog.at_level(logging.INFO, logger="ldm.callbacks"):
        report.on_train_epoch_end(Trainer(), None)
    assert "4 items had an empty caption" in caplog.text and "unconditional" in caplog.text


# ---------------------------------------------------------------- masks


def test_a_mask_file_follows_its_images_crop_and_flip(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :16] = 255  # white on the left third
    Image.fromarray(pixels).save(root / "a.png")
    mask = np.zeros((32, 48), np.uint8)
    mask[:, :16] = 255  # the mask keeps that white third
    Image.fromarray(mask).save(root / "a.mask.png")
    (root / "a.txt").write_text("a white bar")
    for crop, flip_p in (("center", 0.0), ("random", 0.5)):
        folder = ImageCaptionFolder(root, size=24, crop=crop, flip_p=flip_p, masks="file")
        assert len(folder) == 1  # the mask file is not taken for an image
        for seed in range(6):
            np.random.seed(seed)
            item = folder[0]
            white = item["image"].mean(axis=2) > 0  # (24, 24)
            np.testing.assert_array_equal(item["loss_mask"][:, :, 0] > 0.5, white)


def test_an_alpha_channel_is_a_mask_and_a_missing_mask_file_keeps_everything(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[4:12, 4:12, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "cut.png")
    (root / "cut.txt").write_text("a cut-out")
    mask = ImageCaptionFolder(root, size=16, masks="alpha")[0]["loss_mask"][:, :, 0]
    assert mask[8, 8] == 1.0 and mask[0, 0] == 0.0 and mask.sum() == 64
    assert ImageCaptionFolder(root, size=16, masks="file")[0]["loss_mask"].min() == 1.0


def test_a_mask_of_another_size_is_named(tmp_path):
    root = write_images(tmp_path / "images", 2)
    Image.new("L", (30, 32), 255).save(root / "1.mask.png")
    with pytest.raises(ValueError, match="1 masks differ in size.*1.mask.png \\(30, 32\\) vs"):
        ImageCaptionFolder(root, size=32, masks="file")


def loss_fn() -> DiffusionLoss:
    return DiffusionLoss(schedule.make_beta_schedule("linear", 1000, 0.00085, 0.012))


def test_masked_loss_is_the_plain_loss_with_an_all_ones_mask_and_ignores_zeros():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)

    def predict(x_t, t, self_cond):
        return prediction

    plain, _ = loss_fn()(predict, x0, t, noise)
    ones, _ = loss_fn()(predict, x0, t, noise, mask=torch.ones(2, 1, 32, 32))  # pixel grid
    torch.testing.assert_close(ones, plain)
    mask = torch.ones(2, 1, 32, 32)
    mask[:, :, :, :16] = 0  # the left half of the image: latent columns 0-3
    masked, _ = loss_fn()(predict, x0, t, noise, mask=mask)
    masked.backward()
    assert prediction.grad[..., :4].abs().max() == 0 and prediction.grad[..., 4:].abs().min() > 0
    target = schedule.training_target("eps", x0, t, noise, None)
    by_hand = ((prediction - target)[..., 4:] ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(masked, by_hand)


def test_the_tiny_model_weighs_its_loss_by_a_folders_masks(tmp_path):
    """Item 0 masked out entirely, item 1 not at all: the loss is what item weights 0 and 1
    give (the same draws: a mask takes no random numbers)."""
    root = write_images(tmp_path / "images", 2, caption="a red square")
    for i in range(2):
        Image.new("L", (32, 32), 255 * i).save(root / f"{i}.mask.png")
    folder = ImageCaptionFolder(root, size=32, masks="file")
    batch = default_collate([folder[0], folder[1]])
    assert batch["loss_mask"].shape == (2, 32, 32, 1)
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(ROOT / "configs/tiny/txt2img.yaml").model)
    model.train()
    torch.manual_seed(1)
    masked, _ = model.shared_step(batch)
    weighted = {k: v for k, v in batch.items() if k != "loss_mask"}
    weighted["loss_weight"] = torch.tensor([0.0, 1.0])
    torch.manual_seed(1)
    by_weights, _ = model.shared_step(weighted)
    torch.testing.assert_close(masked, by_weights)
    torch.manual_seed(1)
    plain, _ = model.shared_step({k: v for k, v in batch.items() if k != "loss_mask"})
    assert abs(plain - masked) > 1e-4  # the comparison can fail


# ---------------------------------------------------------------- data that is wrong


def test_small_images_are_upscaled_with_a_warning_or_skipped_with_a_count(tmp_path, caplog):
    root = write_images(tmp_path / "images", 3, size=(40, 40))
    Image.new("RGB", (20, 24), (0, 0, 255)).save(root / "small.png")
    (root / "small.txt").write_text("small")
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        upscaled = ImageCaptionFolder(root, size=32)
    assert len(upscaled) == 4 and "1 images are smaller than their crop and are upscaled" in (
        caplog.text
    )
    assert upscaled[3]["image"].shape == (32, 32, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        skipped = ImageCaptionFolder(root, size=32, small_images="skip")
    assert len(skipped) == 3 and "1 images smaller than their crop are left out" in caplog.text
    assert "small.png" in caplog.text


def test_metadata_naming_a_file_twice_or_broken_json_is_named(tmp_path):
    root = write_images(tmp_path / "images", 2)
    rows = [{"file_name": "0.png", "text": "a"}, {"file_name": "0.png", "text": "b"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="names 1 files more than once: .*0.png"):
        ImageCaptionFolder(root, size=32)
    (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": ')
    with pytest.raises(ValueError, match="metadata.jsonl, line 2: not valid JSON"):
        ImageCaptionFolder(root, size=32)


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="png")
    return buffer.getvalue()


def test_a_shard_sample_without_a_caption_is_warned_about_and_counted(tmp_path, caplog):
    with wds.TarWriter(str(tmp_path / "000.tar")) as sink:
        sink.write({"__key__": "a", "png": png((255, 0, 0)), "txt": "red"})
        sink.write({"__key__": "b", "png": png((0, 255, 0))})  # no caption
        sink.write({"__key__": "c", "png": png((0, 0, 255)), "txt": "blue"})
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        items = list(WebDatasetShards(str(tmp_path), size=16))
    assert [item["caption"] for item in items] == ["red", "blue"]
    assert [item["skipped"] for item in items] == [0, 1]  # DataReport totals these
    assert "'b'" in caplog.text and "no caption" in caplog.text


def test_a_cached_masked_batch_gives_the_loss_of_the_uncached_one(tmp_path):
    from ldm.data.cache import CachedLatents, CacheSource, build_cache, write_manifest

    root = write_images(tmp_path / "images", 3, caption="a red square")
    for i in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[:, : 8 * (i + 1)] = 255
        Image.fromarray(mask).save(root / f"{i}.mask.png")
    folder = ImageCaptionFolder(root, size=32, masks="file")
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(ROOT / "configs/tiny/txt2img.yaml").model)
    source = CacheSource(folder, 2, "test")
    keys = source.shard_keys("k")
    build_cache(model, source, tmp_path / "cache", keys, batch_size=2)
    write_manifest(tmp_path / "cache", "k", keys, False)
    cached = CachedLatents(tmp_path / "cache", "k")
    assert (
        cached[2]["loss_mask"].shape == (8, 8, 1)
        and cached[0]["loss_mask"][0, :, 0].tolist() == [1.0] * 2 + [0.0] * 6
    )
    model.train()
    losses = []
    for items in ([folder[i] for i in range(3)], [cached[i] for i in range(3)]):
        torch.manual_seed(3)
        losses.append(model.shared_step(default_collate(items))[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
