"""bench/recipes.py end to end on two training steps per recipe."""

from __future__ import annotations

import pytest
from conftest import ROOT

import main
from bench import recipes


@pytest.mark.slow
def test_recipes_train_score_and_tabulate(tmp_path, capsys):
    main.main(
        [
            "--base",
            str(ROOT / "configs" / "tiny" / "autoencoder.yaml"),
            "-t",
            "--max_steps",
            "1",
            "--no-test",
            "-l",
            str(tmp_path / "ae"),
            "data.params.batch_size=4",
            "data.params.num_workers=0",
            "lightning.trainer.limit_val_batches=1",
        ]
    )
    (ae_run,) = (tmp_path / "ae").iterdir()
    results = recipes.main(
        [
            "--ae_ckpt",
            str(ae_run / "checkpoints" / "last.ckpt"),
            "--steps",
            "2",
            "--recipes",
            "sd,all",
            "--logdir",
            str(tmp_path / "runs"),
            "--n_per_prompt",
            "1",
        ]
    )
    assert [r["recipe"] for r in results] == ["sd", "all"]
    for result in results:
        assert result["steps"] == 2 and result["final_loss_simple"] > 0
        assert set(result["eta0"]) == {"color", "shape", "background"}
    (run,) = (tmp_path / "runs").glob("*_recipe-all")
    project = next((run / "configs").glob("*-project.yaml")).read_text()
    assert "immiscible: true" in project and "offset_noise_strength: 0.1" in project
    assert "| sd |" in capsys.readouterr().out


def test_unknown_recipe_is_named(capsys):
    with pytest.raises(SystemExit, match="nope"):
        recipes.main(["--ae_ckpt", "x.ckpt", "--recipes", "sd,nope"])


def test_unet_vae_and_sampling_benchmarks_time_both_implementations():
    from bench import sampling, unet, vae

    (forward,) = unet.main(
        "--config tiny/txt2img.yaml --sizes 8 --batches 1 --dtypes fp32 --repeats 1".split()
    )
    assert forward["ours_ms"] > 0 and forward["diffusers_ms"] > 0 and forward["ratio"] > 0
    results = vae.main("--config tiny/txt2img.yaml --size 32 --dtypes bf16 --repeats 1".split())
    assert [r["direction"] for r in results] == ["encode", "decode"]
    record = sampling.main("--steps 3 --batch 2 --repeats 1".split())
    assert record["max_abs_difference"] < 1e-3  # the two loops compute the same samples
    assert 0 < record["outside_unet_ours"] < 1


@pytest.mark.slow
def test_train_step_and_train_loop_benchmarks_run(capsys):
    from bench import train_loop, train_step

    results = train_step.main("--cases tiny --checkpointing 0,1 --repeats 1".split())
    assert [r["checkpointing"] for r in results] == [False, True]
    assert all(r["ours_peak_mb"] > 0 and r["ratio"] > 0 for r in results)
    small = "data.params.train.params.length=16 data.params.batch_size=4 data.params.num_workers=0"
    summary = train_loop.main(f"--steps 4 --warmup 1 {small}".split())
    assert summary["images_per_s"][True] > 0 and summary["images_per_s"][False] > 0


@pytest.mark.slow
def test_the_bucket_benchmark_builds_a_cache_and_times_both_loops():
    from bench import buckets

    small = "data.params.batch_size=4 data.params.num_workers=0"
    summary = buckets.main(f"--images 70 --shards 2 --steps 4 --warmup 1 {small}".split())
    # cache_build_s is the difference of two runs' start-up times: for 70 images it is within
    # the machine's noise (CI once measured -0.5 s), so only its presence is checked here
    assert summary["images_per_s"]["bucketed_cached"] > 0
    assert isinstance(summary["cache_build_s"], float)


@pytest.mark.slow
def test_the_memory_table_counts_sd15_and_shards_what_fsdp_shards():
    from bench import memory

    size = memory.sizes(lora=False)
    # SD 1.5's published parameter counts: UNet, CLIP ViT-L/14 text tower, KL-f8 autoencoder
    assert size["params"] | {"trainable": 0, "largest_block": 0} == {
        "unet": 859_520_964,
        "text_encoder": 123_060_480,
        "autoencoder": 83_653_863,
        "trainable": 0,
        "largest_block": 0,
    }
    for activations in size["activations_per_sample_bytes"].values():
        assert 0 < activations["checkpointing"] < activations["no_checkpointing"]
    n = 859_520_964 / 2**30
    ddp = memory.per_gpu(size, "ddp", gpus=8, batch=1, precision="fp32", ckpt=True)
    fsdp = memory.per_gpu(size, "fsdp", gpus=8, batch=1, precision="fp32", ckpt=True)
    # AdamW: weights, gradients and two moments, 4 bytes each; DDP adds buckets and the EMA
    assert ddp["gradients"] + ddp["adamw"] == pytest.approx(12 * n, abs=0.02)
    assert fsdp["gradients"] + fsdp["adamw"] == pytest.approx(12 * n / 8, abs=0.02)
    assert ddp["ema"] == ddp["ddp_buckets"] == pytest.approx(4 * n, abs=0.01)
    assert fsdp["activations"] == ddp["activations"] and fsdp["total"] < ddp["total"] / 4
    fsdp_ema = memory.per_gpu(size, "fsdp_ema", gpus=8, batch=1, precision="fp32", ckpt=True)
    assert fsdp["ema"] == 0 and fsdp_ema["ema"] == pytest.approx(4 * n / 8, abs=0.01)
