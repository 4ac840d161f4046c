"""Images per second of the bucketed, cached loop against the square, uncached one, and the time
to build the cache of a synthetic webdataset shard set.

    python -m bench.buckets [--images 10000] [--shards 10] [--steps 60] [--warmup 10]
        [key=value ...]   # config overrides for every run, as main.py takes them

Writes `--images` procedural images (a shape on a background, as `SyntheticShapes` draws them,
at sizes around 32² px of aspect ratios from 1:2 to 2:1) into `--shards` webdataset shards,
then trains the tiny config through `main.main`: (1) as shipped (square 32 px synthetic items,
uncached), (2) on the shards in aspect-ratio buckets through the latent cache: first the build
(timed apart: encoding every image once), then the training loop on the cache. Validation,
image logging and checkpoints are kept out of the timed steps, as in `bench.train_loop`.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from bench.common import ROOT, emit, environment
from bench.train_loop import timed_run
from ldm.data.synthetic import SyntheticShapes

TINY_BUCKETS = {"resolution": 32, "step": 8, "min_side": 16, "max_side": 64, "max_ratio": 2.0}
SIZES = [(48, 24), (44, 28), (40, 32), (36, 36), (32, 40), (28, 44), (24, 48)]  # (w, h)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--images", type=int, default=10000)
    add("--shards", type=int, default=10)
    add("--steps", type=int, default=60)
    add("--warmup", type=int, default=10, help="steps left out of the rate")
    add("--precision", default="32", choices=["32", "bf16-mixed"])
    return parser


def write_shards(root: Path, images: int, shards: int) -> float:
    """Seconds to write `images` PNGs of SIZES' shapes into `shards` tars under `root`."""
    start = time.perf_counter()
    root.mkdir(parents=True)
    square = SyntheticShapes(size=48, length=images, seed=0)
    per_shard = -(-images // shards)
    for shard in range(shards):
        with wds.TarWriter(str(root / f"{shard:04d}.tar")) as sink:
            for i in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
                item = square[i]
                pixels = ((item["image"] + 1) * 127.5).round().astype(np.uint8)
                image = Image.fromarray(pixels).resize(SIZES[i % len(SIZES)], Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="png")
                sink.write(
                    {"__key__": f"{i:06d}", "png": buffer.getvalue(), "txt": item["caption"]}
                )
    return time.perf_counter() - start


def bucketed_config(path: Path, shards: Path, cache: Path) -> str:
    config = OmegaConf.load(ROOT / "configs/tiny/txt2img.yaml")
    config.data.params.train = {
        "target": "ldm.data.shards.WebDatasetShards",
        "params": {"urls": str(shards), "size": 32, "buckets": TINY_BUCKETS},
    }
    del config.data.params["validation"]
    config.lightning.callbacks.latent_cache = {
        "target": "ldm.data.cache.LatentCache",
        "params": {"dir": str(cache), "splits": ["train"], "shard_size": 1024, "batch_size": 64},
    }
    OmegaConf.save(config, path)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    opt, extra = get_parser().parse_known_args(argv)
    emit({"bench": "buckets", **environment(), "images": opt.images, "shards": opt.shards})
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        written = write_shards(work / "shards", opt.images, opt.shards)
        emit({"case": "write shards", "seconds": round(written, 1)})
        square = timed_run(opt, work / "square", [str(ROOT / "configs/tiny/txt2img.yaml")], extra)
        emit({"case": "square, uncached", **square})
        config = bucketed_config(work / "buckets.yaml", work / "shards", work / "cache")
        build = argparse.Namespace(**{**vars(opt), "steps": 3, "warmup": 0})
        first = timed_run(build, work / "build", [config], extra)
        emit({"case": "bucketed: cache build + 3 steps", **first})
        bucketed = timed_run(opt, work / "bucketed", [config], extra)
        emit({"case": "bucketed, cached", **bucketed})
    summary = {
        "cache_build_s": round(
            first["seconds_to_first_step"] - bucketed["seconds_to_first_step"], 1
        ),
        "images_per_s": {
            "square_uncached": square["images_per_s"],
            "bucketed_cached": bucketed["images_per_s"],
        },
        "speedup": round(bucketed["images_per_s"] / square["images_per_s"], 3),
    }
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
