"""Data sets and DataModule: synthetic shapes, image folders, webdataset shards, loaders."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from ldm.callbacks import DataReport
from ldm.data import (
    DataModuleFromConfig,
    ImageCaptionFolder,
    SyntheticShapes,
    WebDatasetShards,
    WrappedDataset,
)
from ldm.data.datamodule import cpu_count, worker_init_fn
from ldm.data.sampler import ResumableSampler
from ldm.data.synthetic import DEFAULT_SHAPES, PALETTE, SHAPES, caption_for, draw_shape
from ldm.util import instantiate_from_config

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def to_uint8(image) -> np.ndarray:
    return np.rint((np.asarray(image) + 1) * 127.5).astype(np.uint8)


def png_bytes(size: tuple[int, int] = (8, 8), color=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def stripes(path: Path, colors, width: int = 10, height: int = 10) -> Path:
    """An image of vertical stripes, one `width`-px stripe per colour."""
    pixels = np.concatenate([np.full((height, width, 3), c, np.uint8) for c in colors], axis=1)
    Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------- synthetic shapes


def test_synthetic_items_are_channels_last_float_in_range():
    item = SyntheticShapes(size=32, length=10)[0]
    assert set(item) == {"image", "caption", "color", "shape", "background"}
    image = item["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_synthetic_is_a_pure_function_of_seed_and_index():
    a, b = SyntheticShapes(length=10, seed=0), SyntheticShapes(length=10, seed=0)
    np.testing.assert_array_equal(a[3]["image"], a[3]["image"])
    np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
    other = SyntheticShapes(length=10, seed=1)
    assert any(not np.array_equal(a[i]["image"], other[i]["image"]) for i in range(5))
    with pytest.raises(IndexError, match="out of range"):
        a[10]


def test_synthetic_caption_corners_and_shape_colour_match_labels():
    ds = SyntheticShapes(size=32, length=50)
    for i in range(50):
        item = ds[i]
        color, shape, background = item["color"], item["shape"], item["background"]
        assert color != background
        expected = f"a {ds.color_names[color]} {ds.shape_names[shape]} on a "
        assert item["caption"] == expected + f"{ds.color_names[background]} background"
        assert item["caption"] == ds.caption(color, shape, background)
        pixels = to_uint8(item["image"])
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            np.testing.assert_array_equal(corner, ds.color_values[background])
        # The centroid of the shape's pixels lies inside it (all default shapes contain it).
        ys, xs = np.nonzero(np.all(pixels == ds.color_values[color], axis=-1))
        assert len(ys) > 10
        centre = pixels[int(ys.mean()), int(xs.mean())]
        np.testing.assert_array_equal(centre, ds.color_values[color])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_draw_shape_puts_colour_at_centre_and_background_in_corner(shape):
    pixels = draw_shape(shape, 32, center=(16.0, 16.0), radius=10.0, color=RED, background=BLUE)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[16, 16], RED)
    np.testing.assert_array_equal(pixels[0, 0], BLUE)
    # Anti-aliased edges: some pixels are blends of the two colours.
    blends = ~np.all(pixels == RED, -1) & ~np.all(pixels == BLUE, -1)
    assert blends.any()


def test_synthetic_render_draws_the_requested_combination():
    ds = SyntheticShapes(size=32)
    image = to_uint8(ds.render(0, 1, 2, np.random.default_rng(0)))
    np.testing.assert_array_equal(image[0, 0], ds.color_values[2])
    assert np.all(image == ds.color_values[0], axis=-1).sum() > 10


def test_synthetic_covers_every_colour_and_shape_in_200_items():
    ds = SyntheticShapes(size=16, length=200)
    items = [ds[i] for i in range(200)]
    assert {it["color"] for it in items} == set(range(len(PALETTE)))
    assert {it["background"] for it in items} == set(range(len(PALETTE)))
    assert {it["shape"] for it in items} == set(range(len(DEFAULT_SHAPES)))


def test_synthetic_accepts_colour_names_or_a_mapping_and_a_shape_subset():
    by_name = SyntheticShapes(colors=["red", "blue"], shapes=["circle", "square"])
    assert by_name.color_names == ["red", "blue"] and by_name.shape_names == ["circle", "square"]
    by_value = SyntheticShapes(colors={"orange": [255, 128, 0], "black": [0, 0, 0]})
    assert by_value.caption(0, 0, 1) == "an orange circle on a black background"
    assert {by_value[i]["caption"].split()[1] for i in range(20)} == {"orange", "black"}


@pytest.mark.parametrize(
    "params,match",
    [
        ({"colors": ["red", "teal"]}, "teal"),
        ({"colors": ["red"]}, "at least 2"),
        ({"colors": {"red": [300, 0, 0], "blue": [0, 0, 255]}}, "RGB"),
        ({"shapes": ["hexagon"]}, "hexagon"),
        ({"max_scale": 0.99}, "max_scale"),
        ({"min_scale": 0.7, "max_scale": 0.5}, "min_scale"),
    ],
)
def test_synthetic_rejects_bad_params_by_name(params, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapes(**params)


def test_caption_for_is_usable_without_a_data_set():
    assert caption_for("red", "circle", "blue") == "a red circle on a blue background"
    assert SyntheticShapes.caption_for("red", "cross", "white").startswith("a red cross")


# ---------------------------------------------------------------- image folders


def test_folder_with_txt_captions_recurses_resizes_and_crops(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 24), RED).save(tmp_path / "a.png")
    Image.new("RGB", (24, 40), GREEN).save(tmp_path / "sub" / "b.JPG")
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "sub" / "b.txt").write_text("a green thing")
    ds = ImageCaptionFolder(tmp_path, size=16)
    assert len(ds) == 2
    for i, caption in enumerate(["a red thing", "a green thing"]):
        item = ds[i]
        assert item["caption"] == caption
        assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    np.testing.assert_allclose(ds[0]["image"][8, 8], [1.0, -1.0, -1.0], atol=0.02)


def test_folder_with_metadata_jsonl_uses_the_caption_key(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("x.png", "y.webp"):
        Image.new("RGB", (12, 12), BLUE).save(tmp_path / "imgs" / name)
    rows = [{"file_name": "imgs/x.png", "prompt": "ex"}, {"file_name": "imgs/y.webp", "prompt": 7}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ImageCaptionFolder(tmp_path, size=8, caption_key="prompt")
    assert [ds[i]["caption"] for i in range(2)] == ["ex", "7"]
    assert ds[1]["image"].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="line 1: missing keys \\['text'\\]"):
        ImageCaptionFolder(tmp_path, size=8)


def test_center_crop_keeps_the_middle(tmp_path):
    stripes(tmp_path / "s.png", [RED, GREEN, BLUE])
    (tmp_path / "s.txt").write_text("stripes")
    image = to_uint8(ImageCaptionFolder(tmp_path, size=10)[0]["image"])
    assert np.all(image == GREEN)


def test_random_crop_moves_and_flip_mirrors(tmp_path):
    stripes(tmp_path / "s.png", [RED, GREEN, BLUE], width=5)  # 15 × 10 px
    (tmp_path / "s.txt").write_text("stripes")
    np.random.seed(0)
    plain = ImageCaptionFolder(tmp_path, size=10, crop="random")
    lefts = {tuple(to_uint8(plain[0]["image"])[0, 0]) for _ in range(30)}
    assert lefts == {RED, GREEN}  # left edge at 0..5: starts in the red or the green stripe
    flipped = ImageCaptionFolder(tmp_path, size=10, crop="center", flip_p=1.0)
    image = to_uint8(flipped[0]["image"])
    unflipped = to_uint8(ImageCaptionFolder(tmp_path, size=10)[0]["image"])
    np.testing.assert_array_equal(image, unflipped[:, ::-1])
    assert tuple(image[0, 0]) == BLUE


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    Image.new("RGB", (8, 8), RED).save(tmp_path / "good.png")
    for name in ("bad", "good"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = ImageCaptionFolder(tmp_path, size=8)
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        assert ds[0]["caption"] == "good"  # bad.png sorts first; the next item stands in
        assert ds[0]["caption"] == "good"
    assert ds.skipped == 1 and ds.skipped_files == {tmp_path / "bad.png"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad.png" in warnings[0]


def test_skipped_images_are_totalled_per_epoch_across_workers(tmp_path, caplog):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    for i in range(3):
        Image.new("RGB", (8, 8), RED).save(tmp_path / f"good{i}.png")
    for path in tmp_path.glob("*.png"):
        path.with_suffix(".txt").write_text(path.stem)
    folder = {
        "target": "ldm.data.folder.ImageCaptionFolder",
        "params": {"root": str(tmp_path), "size": 8},
    }
    data = DataModuleFromConfig(batch_size=2, train=folder, num_workers=2)
    report = DataReport()
    for batch in data.train_dataloader():
        report.on_train_batch_end(None, None, None, batch, 0)
    assert report.counts["skipped"] == 1

    class Trainer:
        current_epoch = 0

    with caplog.at_level(logging.WARNING, logger="ldm.callbacks"):
        report.on_train_epoch_end(Trainer(), None)
    assert "1 unreadable images were skipped" in caplog.text and report.counts["skipped"] == 0


def test_folder_of_only_corrupt_images_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "bad.txt").write_text("junk")
    with pytest.raises(RuntimeError, match="unreadable"):
        ImageCaptionFolder(tmp_path, size=8)[0]


def test_empty_folder_raises_naming_folder_and_extensions(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*\\.png.*\\.webp"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageCaptionFolder(tmp_path / "absent")


def test_image_without_caption_raises_naming_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    (tmp_path / "fine.txt").write_text("ok")
    with pytest.raises(FileNotFoundError, match="1 images have no caption.*lonely.png"):
        ImageCaptionFolder(tmp_path)


def test_metadata_naming_missing_files_raises_naming_them(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    rows = [{"file_name": "here.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError, match="1 missing files.*gone.png"):
        ImageCaptionFolder(tmp_path)


@pytest.mark.parametrize(
    "params,match", [({"crop": "top"}, "crop"), ({"flip_p": 2.0}, "flip_p"), ({"size": 0}, "size")]
)
def test_folder_rejects_bad_transform_params(tmp_path, params, match):
    with pytest.raises(ValueError, match=match):
        ImageCaptionFolder(tmp_path, **params)


# ---------------------------------------------------------------- webdataset shards

N_SHARDS, PER_SHARD = 4, 3
ALL_CAPTIONS = {f"shard {s} item {i}" for s in range(N_SHARDS) for i in range(PER_SHARD)}


def make_sample(key: str, caption: str, png: bytes, caption_format: str) -> dict:
    """A webdataset sample with its caption in `.txt`, or in `.json` under caption / text."""
    if caption_format == "txt":
        return {"__key__": key, "png": png, "txt": caption}
    field = {"json": "caption", "json-text": "text"}[caption_format]
    return {"__key__": key, "png": png, "json": json.dumps({field: caption, "width": 8})}


def write_shards(root: Path, caption_format: str = "txt", corrupt: str | None = None) -> Path:
    """Four shards of three 8×8 samples each; `corrupt` names a key whose png is garbage."""
    root.mkdir(exist_ok=True)
    for s in range(N_SHARDS):
        with wds.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for i in range(PER_SHARD):
                key, caption = f"s{s}i{i}", f"shard {s} item {i}"
                png = b"garbage" if key == corrupt else png_bytes(color=(s * 60, i * 80, 0))
                sink.write(make_sample(key, caption, png, caption_format))
    return root


def captions_of(dataset, num_workers: int = 0) -> Counter:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return Counter(item["caption"] for item in loader)


@pytest.mark.parametrize("form", ["pattern", "directory", "list"])
def test_shards_read_every_sample_once(tmp_path, form):
    root = write_shards(tmp_path / "shards")
    urls = {
        "pattern": str(root / "{000..003}.tar"),
        "directory": str(root),
        "list": [str(root / f"{s:03d}.tar") for s in range(N_SHARDS)],
    }[form]
    dataset = WebDatasetShards(urls, size=8)
    item = next(iter(dataset))
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.float32
    assert captions_of(dataset) == Counter(ALL_CAPTIONS)


def test_two_workers_split_shards_without_duplicates(tmp_path):
    dataset = WebDatasetShards(str(write_shards(tmp_path / "shards")), size=8)
    assert captions_of(dataset, num_workers=2) == Counter(ALL_CAPTIONS)


@pytest.mark.parametrize("caption_format", ["json", "json-text"])
def test_shards_read_json_captions(tmp_path, caption_format):
    dataset = WebDatasetShards(str(write_shards(tmp_path / "s", caption_format)), size=8)
    assert captions_of(dataset) == Counter(ALL_CAPTIONS)


def test_corrupt_sample_in_a_shard_is_skipped_with_a_warning(tmp_path, caplog):
    dataset = WebDatasetShards(str(write_shards(tmp_path / "s", corrupt="s2i1")), size=8)
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        captions = captions_of(dataset)
    assert captions == Counter(ALL_CAPTIONS - {"shard 2 item 1"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "s2i1" in warnings[0] and "002.tar" in warnings[0]


def test_rank_split_gives_disjoint_halves_covering_all(tmp_path):
    root = str(write_shards(tmp_path / "s"))
    halves = [
        captions_of(WebDatasetShards(root, size=8, rank=r, world_size=2), num_workers=2)
        for r in (0, 1)
    ]
    assert all(max(h.values()) == 1 and len(h) == N_SHARDS * PER_SHARD // 2 for h in halves)
    assert set(halves[0]).isdisjoint(halves[1])
    assert set(halves[0]) | set(halves[1]) == ALL_CAPTIONS


def test_shuffles_reorder_but_keep_every_sample(tmp_path):
    root = str(write_shards(tmp_path / "s"))
    ordered = [it["caption"] for it in WebDatasetShards(root, size=8)]
    dataset = WebDatasetShards(root, size=8, shardshuffle=True, shuffle=5, seed=3)
    first, second = ([it["caption"] for it in dataset] for _ in range(2))
    assert sorted(first) == sorted(ordered) == sorted(second)
    assert first != ordered and first != second  # each pass (epoch) draws a new order


def test_uneven_split_is_warned_about(tmp_path, caplog):
    dataset = WebDatasetShards(str(write_shards(tmp_path / "s")), size=8, rank=0, world_size=3)
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        next(iter(dataset))
    assert "4 shards over 3 ranks" in caplog.text


def test_shard_params_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing shards.*009.tar"):
        WebDatasetShards(str(tmp_path / "{008..009}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        WebDatasetShards(str(tmp_path))
    root = str(write_shards(tmp_path / "s"))
    with pytest.raises(ValueError, match="'rank'"):
        WebDatasetShards(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="'world_size'"):
        WebDatasetShards(root, rank=0)


# ---------------------------------------------------------------- DataModuleFromConfig


def shapes_config(length: int, seed: int = 0) -> dict:
    target = "ldm.data.synthetic.SyntheticShapes"
    return {"target": target, "params": {"size": 16, "length": length, "seed": seed}}


def test_datamodule_from_omegaconf_yields_batches_of_batch_size():
    config = OmegaConf.create(
        {
            "target": "ldm.data.DataModuleFromConfig",
            "params": {
                "batch_size": 4,
                "num_workers": 0,
                "train": shapes_config(10),
                "validation": shapes_config(6, seed=1),
            },
        }
    )
    data = instantiate_from_config(config)
    data.setup("fit")
    train = list(data.train_dataloader())
    assert len(train) == 2  # 10 items, last partial batch dropped
    batch = train[0]
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert all(isinstance(c, str) for c in batch["caption"])
    val = list(data.val_dataloader())
    assert [len(b["caption"]) for b in val] == [4, 2]  # validation keeps every item
    assert is_overridden("val_dataloader", data) and not is_overridden("test_dataloader", data)


def test_datamodule_shuffles_map_style_but_never_iterable_data(tmp_path):
    root = str(write_shards(tmp_path / "s"))
    shards = {"target": "ldm.data.shards.WebDatasetShards", "params": {"urls": root, "size": 8}}
    data = DataModuleFromConfig(
        batch_size=2,
        train=shards,
        validation=shapes_config(4),
        test=shapes_config(4),
        num_workers=0,
        shuffle_val_dataloader=True,
    )
    assert not isinstance(data.train_dataloader().sampler, ResumableSampler)
    assert data.val_dataloader().sampler.shuffle
    assert not data.test_dataloader().sampler.shuffle
    assert sum(len(b["caption"]) for b in data.train_dataloader()) == N_SHARDS * PER_SHARD
    shuffled = DataModuleFromConfig(2, test=shapes_config(4), shuffle_test_loader=True)
    assert shuffled.test_dataloader().sampler.shuffle


def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes():
    sampler = ResumableSampler(10, shuffle=True, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(10)) and first != second
    assert list(ResumableSampler(10, shuffle=True, seed=3)) == first
    resumed = ResumableSampler(10, shuffle=True, seed=3)
    resumed.resume(epoch=1, start=4)
    assert list(resumed) == second[4:]
    assert list(resumed) == list(ResumableSampler(10, True, 3).order(2))


def test_sampler_splits_ranks_disjointly(monkeypatch):
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr("ldm.data.sampler.rank_and_world_size", lambda r=rank: (r, 2))
        halves.append(list(ResumableSampler(11, shuffle=True, seed=0)))
    assert len(halves[0]) == len(halves[1]) == 5
    assert not set(halves[0]) & set(halves[1])


def test_datamodule_workers_default_wrap_and_init_fn():
    data = DataModuleFromConfig(batch_size=64, train=shapes_config(64), wrap=True)
    assert data.num_workers == min(128, cpu_count())
    data = DataModuleFromConfig(
        batch_size=2, train=shapes_config(4), wrap=True, num_workers=1, use_worker_init_fn=True
    )
    loader = data.train_dataloader()
    assert isinstance(data.datasets["train"], WrappedDataset) and len(data.datasets["train"]) == 4
    assert loader.persistent_workers and loader.worker_init_fn is worker_init_fn
    plain = DataModuleFromConfig(2, train=shapes_config(4), num_workers=0).train_dataloader()
    assert plain.worker_init_fn is None and not plain.persistent_workers


def test_worker_init_fn_seeds_numpy_from_the_worker_seed():
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        worker_init_fn(0)
        draws.append(np.random.randint(2**31))
    assert draws[0] == draws[1] != draws[2]


def test_datamodule_rejects_a_train_set_smaller_than_a_batch():
    with pytest.raises(ValueError, match="3 items, fewer than batch_size 4"):
        DataModuleFromConfig(batch_size=4, train=shapes_config(3)).setup("fit")


def test_train_items_are_a_function_of_seed_epoch_and_index_not_of_workers(tmp_path):
    """Random crops and flips come out the same with 0 or 2 workers and after a resume."""
    for i in range(8):
        stripes(tmp_path / f"{i}.png", [RED, GREEN, BLUE, (i * 30, 0, 0)], width=4)  # 16 × 10
        (tmp_path / f"{i}.txt").write_text(f"stripes {i}")
    params = {"root": str(tmp_path), "size": 8, "crop": "random", "flip_p": 0.5}
    folder = {"target": "ldm.data.folder.ImageCaptionFolder", "params": params}

    def loader(num_workers: int):
        torch.manual_seed(3)  # the run's seed, which the data module reads
        return DataModuleFromConfig(2, train=folder, num_workers=num_workers).train_dataloader()

    def epoch(batches) -> dict[str, np.ndarray]:
        pairs = (zip(b["caption"], b["image"], strict=True) for b in batches)
        return {caption: image.numpy() for batch in pairs for caption, image in batch}

    plain = loader(0)
    epochs = [epoch(plain), epoch(plain)]
    workers = loader(2)
    for expected in epochs:
        got = epoch(workers)
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[c], expected[c]) for c in expected)
    assert any(not np.array_equal(epochs[0][c], epochs[1][c]) for c in epochs[0])  # per epoch
    resumed = loader(2)
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    tail = epoch(resumed)
    assert len(tail) == 4 and all(np.array_equal(tail[c], epochs[1][c]) for c in tail)
