"""Aspect-ratio buckets: the bucket set, assignment, one-bucket batches, DDP, exact resume, and
the latent cache per bucket (folders and webdataset shards, keyed by the files' contents)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from conftest import ROOT
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

import main
from ldm.data import DataModuleFromConfig, ImageCaptionFolder, WebDatasetShards
from ldm.data.buckets import BucketSpec, merge_small_buckets
from ldm.data.cache import CachedLatents, CacheSource, build_cache, write_manifest
from ldm.util import ConfigError, instantiate_from_config

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
# The tiny model's buckets: ~32² px, sides multiples of 8 (its autoencoder's f = 4 times its
# UNet's one downsampling): 40x24, 32x32 and 24x40.
TINY_BUCKETS = {"resolution": 32, "step": 8, "min_side": 16, "max_side": 64, "max_ratio": 2.0}
SHAPES = {"wide": (80, 48), "square": (36, 36), "tall": (48, 80)}


def write_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """`counts[shape]` noise images of each of SHAPES' sizes, captioned with their name."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for shape, n in counts.items():
        width, height = SHAPES[shape]
        for i in range(n):
            pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"{shape}{i}.png")
            (root / f"{shape}{i}.txt").write_text(f"{shape} {i}")
    return root


def folder_config(root: Path, **params) -> dict:
    return {
        "target": "ldm.data.folder.ImageCaptionFolder",
        "params": {"root": str(root), "size": 32, "buckets": TINY_BUCKETS, **params},
    }


# ---------------------------------------------------------------- the bucket set


def test_sd_buckets_keep_the_area_step_sides_and_ratio():
    spec = BucketSpec()  # SD at 512: step 64 = 8 x the autoencoder's f = 8
    sizes = spec.sizes
    assert (512, 512) in sizes and len(sizes) == len(set(sizes)) == 5
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert 512**2 - 64 * 1024 < width * height <= 512**2
        assert 256 <= min(width, height) and max(width, height) <= 1024
        assert max(width, height) / min(width, height) <= 2.0
        assert (height, width) in sizes
    assert (640, 384) in sizes and (768, 320) not in sizes  # ratio 2.4
    assert (768, 320) in BucketSpec(max_ratio=2.5).sizes
    wide = BucketSpec(resolution=1024, min_side=512, max_side=2048, max_ratio=4.0).sizes
    assert (2048, 512) in wide and (1024, 1024) in wide  # SDXL-sized buckets


def nearest_by_hand(sizes: list, width: int, height: int) -> tuple[int, int]:
    """The bucket whose width/height is nearest width/height in |log ratio|, found by hand."""
    errors = [abs(math.log((w / h) / (width / height))) for w, h in sizes]
    return sizes[errors.index(min(errors))]


def test_every_image_goes_to_the_bucket_nearest_its_ratio():
    spec = BucketSpec()
    rng = np.random.default_rng(0)
    for width, height in rng.integers(100, 4000, (200, 2)):
        assert spec.nearest((int(width), int(height))) == nearest_by_hand(spec.sizes, width, height)
    assert spec.nearest((1920, 1080)) == (640, 384) and spec.nearest((1080, 1920)) == (384, 640)
    assert spec.nearest((1000, 1000)) == (512, 512)


def test_folder_buckets_follow_the_exif_orientation(tmp_path):
    root = write_folder(tmp_path / "images", {"wide": 1, "tall": 1})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown rotated by 90 degrees: tall
    Image.new("RGB", (80, 48), (200, 0, 0)).save(root / "rotated.jpg", exif=exif)
    (root / "rotated.txt").write_text("rotated")
    folder = ImageCaptionFolder(**folder_config(root)["params"])
    by_name = {p.stem: size for p, size in zip(folder.images, folder.bucket_sizes, strict=True)}
    assert by_name == {"rotated": (24, 40), "tall0": (24, 40), "wide0": (40, 24)}
    assert folder[2]["image"].shape == (24, 40, 3)  # (H, W, 3) of the 40 x 24 bucket


@pytest.mark.parametrize(
    ("buckets", "match"),
    [
        ({"resolution": 500}, "resolution 500 is not a multiple of step 64"),
        ({"step": 0}, "buckets.step: expected pixels"),
        ({"min_side": 1024, "max_side": 512}, "min_side ≤ resolution ≤ max_side"),
        ({"max_ratio": 0.5}, "max_ratio: expected a number ≥ 1"),
        ({"reso": 512}, "unknown keys \\['reso'\\]"),
    ],
)
def test_bad_bucket_specs_are_named(tmp_path, buckets, match):
    root = write_folder(tmp_path / "images", {"wide": 1})
    with pytest.raises(ConfigError, match=match):
        ImageCaptionFolder(root, buckets=buckets)


def test_a_bucketed_image_is_resized_to_cover_its_bucket_and_centre_cropped(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    pixels = np.zeros((50, 80, 3), np.uint8)  # 80 x 50: resized to 40 x 25, 1 row cropped
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    Image.fromarray(pixels).save(root / "a.png")
    (root / "a.txt").write_text("halves")
    image = ImageCaptionFolder(**folder_config(root)["params"])[0]["image"]
    assert image.shape == (24, 40, 3)
    np.testing.assert_allclose(image[12, 5], [1, -1, -1], atol=0.02)  # left half red
    np.testing.assert_allclose(image[12, 35], [-1, -1, 1], atol=0.02)  # right half blue


# ---------------------------------------------------------------- batches


def epoch_batches(data: DataModuleFromConfig) -> list[dict]:
    """The batches of the next epoch of `data`'s train loader (made once, as Lightning does)."""
    if not hasattr(data, "loader"):
        data.loader = data.train_dataloader()
    return list(data.loader)


def test_a_batch_never_mixes_buckets_and_each_epoch_is_seeded(tmp_path):
    root = write_folder(tmp_path / "images", {"wide": 8, "square": 6, "tall": 4})
    data = DataModuleFromConfig(batch_size=2, train=folder_config(root), num_workers=0)
    batches = epoch_batches(data)
    assert len(batches) == 9 and len(data.loader) == 9
    for batch in batches:
        shapes = {caption.split()[0] for caption in batch["caption"]}
        assert len(shapes) == 1  # one bucket
        expected = {"wide": (24, 40), "square": (32, 32), "tall": (40, 24)}[shapes.pop()]
        assert tuple(batch["image"].shape[1:3]) == expected
    seen = Counter(c for batch in batches for c in batch["caption"])
    assert len(seen) == 18 and set(seen.values()) == {1}
    again = DataModuleFromConfig(batch_size=2, train=folder_config(root), num_workers=2)
    assert [b["caption"] for b in epoch_batches(again)] == [b["caption"] for b in batches]
    second = [b["caption"] for b in epoch_batches(data)]  # the loader's next epoch
    assert second != [b["caption"] for b in batches]


def test_buckets_too_small_for_a_batch_merge_into_the_nearest(tmp_path, caplog):
    root = write_folder(tmp_path / "images", {"wide": 5, "square": 4, "tall": 1})
    with caplog.at_level(logging.INFO, logger="ldm.data.buckets"):
        data = DataModuleFromConfig(batch_size=4, train=folder_config(root), num_workers=0)
        data.setup()
    assert "1 items in 1 buckets with fewer than 4 (the batch size) merged" in caplog.text
    assert "24x40->32x32" in caplog.text
    for _ in range(3):  # epochs: the wide bucket's remainder sits out, never a short batch
        batches = epoch_batches(data)
        assert [len(b["caption"]) for b in batches] == [4, 4]
    tall = [b for b in epoch_batches(data) for c in b["caption"] if c.startswith("tall")]
    assert all(tuple(b["image"].shape[1:3]) == (32, 32) for b in tall)
    assert merge_small_buckets([(40, 24)] * 3 + [(24, 40)] * 2, 4) == {(24, 40): (40, 24)}


def ddp_captions(rank: int, world_size: int, port: int, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(7)  # main.py seeds every rank with the run's seed
    try:
        data = DataModuleFromConfig(batch_size=2, train=config, num_workers=0)
        batches = [(list(b["caption"]), list(b["image"].shape)) for b in data.train_dataloader()]
        Path(out, f"rank{rank}.json").write_text(json.dumps(batches))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_see_every_image_once_an_epoch(tmp_path):
    root = write_folder(tmp_path / "images", {"wide": 8, "square": 4, "tall": 4})
    port = 29500 + os.getpid() % 1000
    mp.spawn(ddp_captions, args=(2, port, folder_config(root), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 8 batches of 2, dealt to 2 ranks
    captions = [c for rank in ranks for batch, _ in rank for c in batch]
    assert len(captions) == 16 and len(set(captions)) == 16  # every image, once
    for rank in ranks:
        for batch, shape in rank:
            assert len({c.split()[0] for c in batch}) == 1 and shape[0] == 2


# ---------------------------------------------------------------- through main.py


def tiny_config(path: Path, train: dict, cached: Path | None = None, batch_size: int = 2) -> Path:
    """The tiny txt2img config training on `train` (no validation), maybe from a cache."""
    config = OmegaConf.load(TINY)
    config.data = {
        "target": "ldm.data.DataModuleFromConfig",
        "params": {"batch_size": batch_size, "num_workers": 0, "train": train},
    }
    if cached is not None:
        config.lightning.callbacks.latent_cache = {
            "target": "ldm.data.cache.LatentCache",
            "params": {"dir": str(cached), "splits": ["train"], "shard_size": 4, "batch_size": 2},
        }
    OmegaConf.save(config, path)
    return path


def train(logs: Path, base: Path, *args: str):
    return main.main(["--base", str(base), "-l", str(logs), "-t", "--no-test", *args])


def assert_same_state(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0, msg=key)


def test_resume_mid_epoch_with_buckets_is_exact(tmp_path):
    """3 + 3 steps equal 6 on a bucketed folder with random crops and flips (an epoch: 6)."""
    root = write_folder(tmp_path / "images", {"wide": 6, "square": 4, "tall": 2})
    folder = folder_config(root, crop="random", flip_p=0.5)
    base = tiny_config(tmp_path / "buckets.yaml", folder)
    whole = train(tmp_path / "whole", base, "--max_steps", "6")
    train(tmp_path / "parts", base, "--max_steps", "3")
    (logdir,) = sorted((tmp_path / "parts").iterdir())
    resumed = main.main(["-r", str(logdir), "-t", "--no-test", "--max_steps", "6"])
    assert resumed.global_step == 6
    assert_same_state(resumed.lightning_module.state_dict(), whole.lightning_module.state_dict())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(TINY).model)


def cache(model, dataset, root: Path, key: str = "k") -> list[int]:
    source = CacheSource(dataset, 4, "test")
    keys = source.shard_keys(key)
    built = build_cache(model, source, root, keys, batch_size=3)
    write_manifest(root, key, keys, source.bucketed)
    return built


def test_a_cached_non_square_batch_gives_the_loss_of_the_uncached_one(model, tmp_path):
    root = write_folder(tmp_path / "images", {"wide": 3, "square": 2, "tall": 3})
    folder = ImageCaptionFolder(**folder_config(root)["params"])
    cache(model, folder, tmp_path / "cache")
    cached = CachedLatents(tmp_path / "cache", "k")
    assert cached.bucket_sizes == folder.bucket_sizes
    wide = [i for i, size in enumerate(folder.bucket_sizes) if size == (40, 24)]
    assert cached[wide[0]]["first_stage_moments"].shape == (8, 6, 10)  # (2C, h, w) of 40 x 24
    model.train()
    losses = []
    for items in ([folder[i] for i in wide], [cached[i] for i in wide]):
        torch.manual_seed(3)  # the same latent samples, dropped captions, timesteps and noise
        losses.append(model.shared_step(default_collate(items))[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)


def test_editing_one_images_bytes_rebuilds_its_shard(model, tmp_path):
    root = write_folder(tmp_path / "images", {"wide": 8, "square": 4})
    params = folder_config(root)["params"]
    assert cache(model, ImageCaptionFolder(**params), tmp_path / "cache") == [0, 1, 2]
    assert cache(model, ImageCaptionFolder(**params), tmp_path / "cache") == []
    # items sort by name: square0-3 (shard 0), wide0-3 (shard 1), wide4-7 (shard 2)
    Image.new("RGB", (80, 48), (0, 255, 0)).save(root / "wide5.png")  # same name and size
    assert cache(model, ImageCaptionFolder(**params), tmp_path / "cache") == [2]
    (root / "wide0.txt").write_text("a new caption")
    assert cache(model, ImageCaptionFolder(**params), tmp_path / "cache") == [1]


def write_shards(root: Path, per_shard: dict[str, int], shards: int = 2) -> Path:
    """`shards` tars, each with `per_shard[shape]` noise images of each shape."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for shape, n in per_shard.items():
                for i in range(n):
                    width, height = SHAPES[shape]
                    pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
                    path = root / "tmp.png"
                    Image.fromarray(pixels).save(path)
                    key = f"s{s}{shape}{i}"
                    sink.write({"__key__": key, "png": path.read_bytes(), "txt": key})
    (root / "tmp.png").unlink()
    return root


def test_streamed_shards_batch_by_bucket(tmp_path):
    root = write_shards(tmp_path / "shards", {"wide": 3, "tall": 2})
    params = {"urls": str(root), "size": 32, "buckets": TINY_BUCKETS}
    train = {"target": "ldm.data.WebDatasetShards", "params": params}
    data = DataModuleFromConfig(batch_size=2, train=train, num_workers=0)
    batches = list(data.train_dataloader())
    assert (
        sorted(tuple(b["image"].shape) for b in batches)
        == [(2, 24, 40, 3)] * 3 + [(2, 40, 24, 3)] * 2
    )
    for batch in batches:
        assert len({key[2:-1] for key in batch["caption"]}) == 1  # s{shard}{shape}{i}: one shape


def test_a_cached_webdataset_trains_without_the_autoencoder(tmp_path, monkeypatch):
    root = write_shards(tmp_path / "shards", {"wide": 3, "square": 2, "tall": 2})
    shards = {
        "target": "ldm.data.shards.WebDatasetShards",
        "params": {"urls": str(root), "size": 32, "buckets": TINY_BUCKETS},
    }
    base = tiny_config(tmp_path / "shards.yaml", shards, cached=tmp_path / "cache")
    train(tmp_path / "logs", base, "--max_steps", "1")
    manifest = json.loads((tmp_path / "cache/train/manifest.json").read_text())
    assert manifest["counts"] == [7, 7] and manifest["bucketed"]
    assert Counter(map(tuple, manifest["sizes"])) == {(40, 24): 6, (32, 32): 4, (24, 40): 4}
    from ldm.models.diffusion.ddpm import LatentDiffusion

    def refuse(*args, **kwargs):
        raise AssertionError("the autoencoder ran on a cached run")

    monkeypatch.setattr(LatentDiffusion, "encode_first_stage", refuse)
    monkeypatch.setattr(WebDatasetShards, "shard_items", refuse)
    trainer = train(tmp_path / "logs2", base, "--max_steps", "4")
    assert trainer.global_step == 4
