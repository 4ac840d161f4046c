"""The SDXL demo's pieces: the synthetic shapes at several sizes (bucketed, judged right at
every size) and the demo end to end on a small budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

import main
from ldm.data.shapes_judge import judge, to_uint8
from ldm.data.synthetic import SyntheticShapes
from scripts import demo_sdxl

SIZES = [[32, 32], [48, 32]]


def test_shapes_at_two_sizes_alternate_and_keep_the_square_items_as_they_were():
    square = SyntheticShapes(size=32, length=8)
    mixed = SyntheticShapes(size=32, length=8, sizes=SIZES)
    assert mixed.bucket_sizes == [(32, 32), (48, 32)] * 4 and square.bucket_sizes is None
    assert mixed[1]["image"].shape == (32, 48, 3)
    np.testing.assert_array_equal(mixed[0]["image"], square[0]["image"])
    with pytest.raises(ValueError, match=r"param 'sizes': expected \[\[width, height\], \.\.\.\]"):
        SyntheticShapes(size=32, sizes=[[16, 32]])


def test_the_judge_reads_wide_shapes_right():
    data = SyntheticShapes(size=32, length=64, sizes=[[48, 32]])
    for i in range(64):
        item = data[i]
        image = to_uint8(torch.from_numpy(item["image"]).permute(2, 0, 1)[None])
        verdict = judge(image[0], data)
        assert (verdict.color, verdict.shape, verdict.background) == (
            item["color"], item["shape"], item["background"]
        ), i  # fmt: skip


def test_the_sdxl_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    ae = main.main(
        ["--base", str(ROOT / "configs/tiny/autoencoder.yaml"), "-t", "--no-test"]
        + ["-l", str(tmp_path / "ae"), "--max_steps", "2", "data.params.batch_size=4"]
        + ["data.params.num_workers=0", "lightning.trainer.limit_val_batches=1"]
    )
    result = demo_sdxl.main(
        ["--autoencoder_run", str(ae.default_root_dir), "--outdir", str(tmp_path / "out")]
        + ["--logdir", str(tmp_path / "logs"), "--steps", "2", "--n_per_prompt", "1"]
        + ["--eval_steps", "2", "--length", "64"]
    )
    assert {"color", "shape", "background", "all"} <= set(result["32x32"]) & set(result["48x32"])
    assert result["n_images_per_size"] == 24
    assert (tmp_path / "out" / "samples_48x32.png").is_file()
