"""Cached first-stage latents and text embeddings: same loss, rebuilt on change, used by main.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, load_config, run_ddp
from torch.utils.data import IterableDataset, default_collate

import main
from ldm.data import SyntheticShapes
from ldm.data.cache import (
    CachedLatents,
    CacheSource,
    LatentCache,
    build_cache,
    fingerprint,
    write_manifest,
)
from ldm.models.diffusion.conditioning import CONTEXT_KEY, MOMENTS_KEY
from ldm.util import instantiate_from_config


@pytest.fixture(scope="module")
def model():
    config = load_config("tiny/txt2img.yaml").model
    config.params.ucg_training.caption.p = 0.5  # drop half the captions, on both paths
    torch.manual_seed(0)
    return instantiate_from_config(config)


def build(model, dataset, root, shard_size=4, key="k") -> list[int]:
    source = CacheSource(dataset, shard_size, "test")
    keys = source.shard_keys(key)
    built = build_cache(model, source, root, keys, batch_size=3)
    write_manifest(root, key, keys, source.bucketed)
    return built


def test_cached_batch_gives_the_loss_of_the_uncached_batch(model, tmp_path):
    dataset = SyntheticShapes(size=32, length=10, seed=3)
    build(model, dataset, tmp_path)
    cached = CachedLatents(tmp_path, "k")
    assert len(cached) == 10 and cached[9]["caption"] == dataset[9]["caption"]
    assert cached[9][MOMENTS_KEY].shape == (8, 8, 8) and cached[9][CONTEXT_KEY].shape == (77, 32)
    indices = [0, 5, 9, 2, 7, 3]
    plain = default_collate([dataset[i] for i in indices])
    from_cache = default_collate([cached[i] for i in indices])
    model.train()
    losses = []
    for batch in (plain, from_cache):
        torch.manual_seed(11)  # the same latent samples, dropped captions, timesteps and noise
        losses.append(model.shared_step(batch)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.manual_seed(11)
    other = model.shared_step(default_collate([dataset[i] for i in [1, 4, 6, 8, 0, 2]]))[0]
    assert abs(other - losses[0]) > 1e-3  # the comparison can fail


def test_cache_is_rebuilt_when_the_model_or_data_change(model, tmp_path):
    dataset = SyntheticShapes(size=32, length=10, seed=3)
    key = fingerprint(model, {"data": {"seed": 3}})
    assert build(model, dataset, tmp_path, key=key) == [0, 1, 2]
    assert build(model, dataset, tmp_path, key=key) == []  # up to date: nothing re-encoded
    (tmp_path / "shard-00001.safetensors").unlink()  # an interrupted build resumes
    assert build(model, dataset, tmp_path, key=key) == [1]
    assert fingerprint(model, {"data": {"seed": 4}}) != key
    with torch.no_grad():
        model.first_stage_model.encoder.conv_in.bias[0] += 1.0
    try:
        new_key = fingerprint(model, {"data": {"seed": 3}})
    finally:
        with torch.no_grad():
            model.first_stage_model.encoder.conv_in.bias[0] -= 1.0
    assert new_key != key
    with pytest.raises(ValueError, match="another model or data set"):
        CachedLatents(tmp_path, new_key)
    assert build(model, dataset, tmp_path, key=new_key) == [0, 1, 2]
    build(model, SyntheticShapes(size=32, length=5, seed=3), tmp_path, key=new_key)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]


def test_ranks_split_the_shards(model, tmp_path):
    dataset = SyntheticShapes(size=32, length=10, seed=3)
    source = CacheSource(dataset, 3, "test")
    keys = source.shard_keys("k")
    ranks = [build_cache(model, source, tmp_path, keys, 3, rank, 2) for rank in (0, 1)]
    assert ranks == [[0, 2], [1, 3]]
    write_manifest(tmp_path, "k", keys, False)
    assert [item["caption"] for item in CachedLatents(tmp_path)] == [
        dataset[i]["caption"] for i in range(10)
    ]


def test_missing_cache_and_streamed_data_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CachedLatents(tmp_path)
    with pytest.raises(ValueError, match="shard_size"):
        LatentCache(str(tmp_path), shard_size=0)


def train_cached(tmp_path, *args: str):
    configs = [str(ROOT / "configs/tiny" / name) for name in ("txt2img.yaml", "cached.yaml")]
    overrides = [
        f"lightning.callbacks.latent_cache.params.dir={tmp_path / 'cache'}",
        "lightning.callbacks.latent_cache.params.shard_size=16",
        "data.params.train.params.length=32",
        "data.params.validation.params.length=8",
        "data.params.batch_size=4",
        "data.params.num_workers=0",
        "lightning.trainer.limit_val_batches=1",
    ]
    argv = ["--base", *configs, "-l", str(tmp_path / "logs"), "-t", "--no-test", *args]
    return main.main([*argv, *overrides])


def test_main_trains_on_the_cache_without_running_the_autoencoder(tmp_path, monkeypatch):
    train_cached(tmp_path, "--max_steps", "1", "-s", "5")
    manifest = json.loads((tmp_path / "cache/train/manifest.json").read_text())
    assert manifest["length"] == 32 and len(list((tmp_path / "cache/train").glob("*.safe*"))) == 2
    assert (tmp_path / "cache/validation/manifest.json").is_file()
    from ldm.models.diffusion.ddpm import LatentDiffusion

    calls = {"encode": 0, "text": 0}

    def count(name, method):
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)

        return counted

    monkeypatch.setattr(
        LatentDiffusion, "encode_first_stage", count("encode", LatentDiffusion.encode_first_stage)
    )
    monkeypatch.setattr(
        LatentDiffusion,
        "get_learned_conditioning",
        count("text", LatentDiffusion.get_learned_conditioning),
    )
    trainer = train_cached(tmp_path, "--max_steps", "3", "-s", "5")
    assert trainer.global_step == 3
    assert calls == {"encode": 0, "text": 1}  # the text encoder ran once, for the empty caption


class EndlessStream(IterableDataset):
    """A stream that cannot be read shard by shard."""

    def __init__(self, **params):
        super().__init__()

    def __iter__(self):
        return iter([])


def test_a_stream_without_shards_cannot_be_cached(tmp_path):
    with pytest.raises(TypeError, match="streamed data set \\(EndlessStream\\) that cannot"):
        train_cached(
            tmp_path, "--max_steps", "1", "data.params.train.target=test_cache.EndlessStream"
        )


@pytest.mark.slow
def test_two_ddp_processes_build_one_cache(tmp_path):
    cache = tmp_path / "cache"
    tiny = ROOT / "configs" / "tiny"
    result = run_ddp(
        tmp_path,
        "--base",
        str(tiny / "txt2img.yaml"),
        str(tiny / "cached.yaml"),
        "-l",
        str(tmp_path / "logs"),
        "--max_steps",
        "2",
        f"lightning.callbacks.latent_cache.params.dir={cache}",
        "lightning.callbacks.latent_cache.params.shard_size=8",
        "data.params.train.params.length=32",
        "data.params.validation.params.length=8",
        "data.params.batch_size=4",
        "data.params.num_workers=0",
        "lightning.trainer.limit_val_batches=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((cache / "train/manifest.json").read_text())["length"] == 32
    assert len(CachedLatents(cache / "train")) == 32  # shards 0, 2 from rank 0 and 1, 3 from 1


def test_a_trainable_text_encoder_caches_only_latents(tmp_path):
    config = load_config("tiny/txt2img.yaml").model
    config.params.cond_stage_trainable = True
    config.params.cond_stage_config.params.freeze = False
    model = instantiate_from_config(config)
    with torch.no_grad():  # no zero-initialised output layer between the loss and the text
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    dataset = SyntheticShapes(size=32, length=4, seed=3)
    build(model, dataset, tmp_path)
    item = CachedLatents(tmp_path)[0]
    assert CONTEXT_KEY not in item and item["caption"] == dataset[0]["caption"]
    loss, _ = model.shared_step(default_collate([CachedLatents(tmp_path)[i] for i in range(4)]))
    loss.backward()  # through the text encoder, which trains
    grads = [p.grad for p in model.cond_stage_model.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_sd_configs_caption_key_txt_finds_the_captions(model, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "cond_stage_key", "txt")  # SD's configs; our data says "caption"
    dataset = SyntheticShapes(size=32, length=3, seed=3)
    build(model, dataset, tmp_path)
    assert CachedLatents(tmp_path, caption_key="txt")[2]["txt"] == dataset[2]["caption"]
