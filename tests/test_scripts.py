"""txt2img.py, img2img.py and convert.py from the command line, on a tiny main.py run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, diffusers_original_config, load_config
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

import main
from ldm import inference
from ldm.checkpoint import ema_key, read_state_dict, save_checkpoint
from ldm.data.synthetic import SyntheticShapes
from ldm.modules.encoders.modules import CLIP_CONFIGS, CLIP_SHARED
from ldm.util import instantiate_from_config
from scripts import common, convert, evaluate, img2img, txt2img

PROMPT = "a red circle on a blue background"
FAST = ["--ddim_steps", "3", "--precision", "full", "--device", "cpu"]
HALF_ATOL = 1e-2


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """A main.py log dir of the tiny text-to-image model after two training steps."""
    root = tmp_path_factory.mktemp("run")
    main.main(
        [
            "--base",
            str(ROOT / "configs" / "tiny" / "txt2img.yaml"),
            "-t",
            "--max_steps",
            "2",
            "--no-test",
            "-l",
            str(root),
            "data.params.batch_size=4",
            "data.params.num_workers=0",
            "lightning.trainer.limit_val_batches=1",
        ]
    )
    (run,) = root.iterdir()
    return run


def pngs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def exits_with(capsys, fn, argv: list[str], *fragments: str) -> None:
    """`fn(argv)` exits with a message that contains every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert exit_info.value.code != 0
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- txt2img


def sample(logdir: Path, out: Path, flags: str = "", *extra: str) -> list[np.ndarray]:
    """txt2img.py on the run with `flags` (space-separated) and `extra` arguments."""
    txt2img.main(["--ckpt", str(logdir), "--outdir", str(out), *FAST, *flags.split(), *extra])
    return [pixels(p) for p in pngs(out / "samples")]


def test_txt2img_writes_numbered_samples_and_a_grid(logdir, tmp_path):
    out = tmp_path / "out"
    images = sample(logdir, out, "--n_samples 2 --n_iter 2 --prompt", PROMPT)
    assert [p.name for p in pngs(out / "samples")] == [f"{i:05}.png" for i in range(4)]
    assert images[0].shape == (32, 32, 3)  # the model's size: 8 × 8 latents, f = 4
    grid = pixels(out / "grid-0000.png")
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 2 × 2 images, 2 px borders
    sample(logdir, out, "--n_samples 2 --n_iter 2")  # a second run adds after what is there
    assert len(pngs(out / "samples")) == 8 and (out / "grid-0001.png").is_file()


@pytest.mark.parametrize("sampler", ["--plms", "--dpm", "--sampler=ddim"])
def test_every_sampler_is_seeded_and_fixed_code_repeats_the_start(logdir, tmp_path, sampler):
    flags = f"--n_samples 1 --n_iter 2 --skip_grid {sampler}"
    first = sample(logdir, tmp_path / "a", f"{flags} --fixed_code")
    again = sample(logdir, tmp_path / "b", f"{flags} --fixed_code")
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert np.array_equal(first[0], first[1])  # one start code, deterministic sampling
    free = sample(logdir, tmp_path / "c", flags)
    assert not np.array_equal(free[0], free[1])


def test_prompts_from_a_file_are_batched(logdir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na green square on a white background\n\nan empty line above\n")
    images = sample(logdir, tmp_path / "out", f"--n_samples 2 --n_iter 1 --from-file {prompts}")
    assert len(images) == 3  # batches of 2 and 1


def test_txt2img_size_comes_from_the_flags(logdir, tmp_path):
    images = sample(
        logdir, tmp_path / "out", "--n_samples 1 --n_iter 1 --H 16 --W 24 --guidance_rescale 0.7"
    )
    assert images[0].shape == (16, 24, 3)


def test_the_ema_weights_are_used_when_present(logdir):
    raw = read_state_dict(logdir / "checkpoints" / "last.ckpt")
    key = "model.diffusion_model.out.2.weight"
    with_ema, _ = inference.load_model(logdir, use_ema=True)
    without, _ = inference.load_model(logdir, use_ema=False)
    assert torch.equal(with_ema.state_dict()[key], raw[ema_key(key)])
    assert torch.equal(without.state_dict()[key], raw[key])
    assert not torch.equal(raw[key], raw[ema_key(key)])


def test_txt2img_failures_are_named(logdir, tmp_path, capsys):
    def fails(flags: str, *fragments: str) -> None:
        exits_with(capsys, txt2img.main, [*flags.split(), *FAST], *fragments)

    fails(f"--ckpt {tmp_path / 'nope.ckpt'}", "nope.ckpt", "does not exist")
    bad = OmegaConf.load(next((logdir / "configs").glob("*-project.yaml")))
    bad.model.params.unet_config.params.model_channels = 64
    OmegaConf.save(bad, tmp_path / "bad.yaml")
    last = logdir / "checkpoints" / "last.ckpt"
    fails(f"--ckpt {last} --config {tmp_path / 'bad.yaml'}", "wrong shape", "input_blocks.0.0")
    outside = tmp_path / "outside.ckpt"
    outside.write_bytes(last.read_bytes())
    fails(f"--ckpt {outside}", "v1-inference.yaml", "missing")  # the original's default config
    fails(f"--ckpt {logdir} --from-file gone.txt", "--from-file gone.txt")


def test_txt2img_runs_as_a_command(logdir, tmp_path):
    script = str(ROOT / "scripts" / "txt2img.py")
    flags = f"--ckpt {logdir} --n_samples 1 --n_iter 1 --outdir {tmp_path}".split()
    result = subprocess.run(
        [sys.executable, script, *flags, *FAST], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "samples" / "00000.png").is_file() and (tmp_path / "grid-0000.png").is_file()


# ---------------------------------------------------------------- img2img


@pytest.fixture
def init_img(tmp_path) -> Path:
    """A 40 × 36 px image of the synthetic data set: not a multiple of 32 either way."""
    item = SyntheticShapes(size=40, length=1)[0]
    array = ((item["image"] + 1) * 127.5).round().astype(np.uint8)[:36]
    path = tmp_path / "init.png"
    Image.fromarray(array).save(path)
    return path


def redraw(logdir, init_img, out, strength: float) -> list[np.ndarray]:
    flags = f"--ckpt {logdir} --init-img {init_img} --outdir {out} --strength {strength}"
    img2img.main([*flags.split(), *FAST, "--n_samples", "2"])
    return [pixels(p) for p in pngs(out / "samples")]


def test_img2img_strength_zero_is_the_reconstruction(logdir, init_img, tmp_path):
    images = redraw(logdir, init_img, tmp_path / "out", 0.0)
    assert len(images) == 2 and images[0].shape == (32, 32, 3)  # 40 × 36 -> 32 × 32
    model, _ = inference.load_model(logdir)
    x = img2img.load_img(str(init_img), 32)
    with torch.no_grad():
        expected = model.first_stage_model.decode(model.first_stage_model.encode(x).mode())
    expected = np.asarray(next(common.to_pil(expected))).astype(int)
    assert np.abs(images[0].astype(int) - expected).max() <= 1


def test_img2img_strength_one_ignores_the_input(logdir, init_img, tmp_path):
    other = tmp_path / "other.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(other)
    first = redraw(logdir, init_img, tmp_path / "a", 1.0)
    second = redraw(logdir, other, tmp_path / "b", 1.0)
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    partial = redraw(logdir, init_img, tmp_path / "c", 0.5)
    assert not np.array_equal(partial[0], first[0])


def test_img2img_failures_are_named(logdir, init_img, tmp_path, capsys):
    def fails(flags: str, *fragments: str) -> None:
        exits_with(capsys, img2img.main, [*f"--ckpt {logdir} {flags}".split(), *FAST], *fragments)

    fails(f"--init-img {init_img} --strength 1.5", "--strength 1.5", "[0, 1]")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fails(f"--init-img {text}", "notes.txt", "not a readable image")
    fails("--init-img missing.png", "missing.png", "no such file")


# ---------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A checkpoint of the tiny model with random weights everywhere, EMA ≠ raw weights."""
    config = load_config("tiny/txt2img.yaml")
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, buffer in model.model_ema.named_buffers():
            if buffer.is_floating_point() and name != "decay":
                buffer.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("random") / "model.ckpt"
    save_checkpoint(model.state_dict(), path)
    return path, model


def export(tmp_path, ckpt, name: str, *flags: str) -> dict:
    config = str(ROOT / "configs" / "tiny" / "txt2img.yaml")
    convert.main(["--ckpt", str(ckpt), "--config", config, "--out", str(tmp_path / name), *flags])
    path = tmp_path / name
    return load_file(path) if path.suffix == ".safetensors" else read_state_dict(path)


def test_export_options(random_run, tmp_path):
    ckpt, model = random_run
    source = model.state_dict()
    kept = export(tmp_path, ckpt, "kept.ckpt")
    assert kept.keys() == source.keys()
    pruned = export(tmp_path, ckpt, "pruned.safetensors", "--drop_ema")
    assert not any(k.startswith("model_ema.") for k in pruned)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(pruned[key], source[key])
    ema = export(tmp_path, ckpt, "ema.safetensors", "--use_ema", "--half")
    assert ema.keys() == pruned.keys()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert ema[key].dtype == torch.float16
    expected = source[ema_key(key)]
    torch.testing.assert_close(ema[key].float(), expected, atol=1e-3, rtol=1e-3)


def test_export_failures_are_named(random_run, tmp_path, capsys):
    ckpt, _ = random_run
    configs = ROOT / "configs" / "tiny"

    def fails(flags: str, *fragments: str) -> None:
        exits_with(capsys, convert.main, [*f"--ckpt {ckpt} {flags}".split()], *fragments)

    fails(f"--out {tmp_path / 'x.pt'}", "x.pt", ".safetensors or .ckpt")
    fails(f"--out {tmp_path / 'x.ckpt'} --config {configs / 'autoencoder.yaml'}", "unexpected")
    pruned = tmp_path / "pruned.ckpt"
    convert.main(
        f"--ckpt {ckpt} --config {configs / 'txt2img.yaml'} --out {pruned} --drop_ema".split()
    )
    ckpt = pruned
    fails(f"--out {tmp_path / 'y.ckpt'} --use_ema", "no model_ema")


def test_export_round_trips_into_diffusers_with_parity(random_run, tmp_path):
    ckpt, model = random_run
    checkpoint = export(tmp_path, ckpt, "model.safetensors", "--use_ema")
    config = load_config("tiny/txt2img.yaml").model
    original = diffusers_original_config(config)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=None)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = DiffusersAutoencoderKL(**vae_config).eval()
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS["ldm/clip-tiny"])).eval()
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})

    prompts = [PROMPT, ""]
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad(), model.ema_scope():
        context = model.get_learned_conditioning(prompts)
        tokens = model.cond_stage_model.tokenize(prompts)
        torch.testing.assert_close(text(input_ids=tokens).last_hidden_state, context)
        eps = unet(z, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(eps, model.apply_model(z, t, context), atol=1e-5, rtol=1e-5)
        decoded = vae.decode(z / model.scale_factor).sample
        torch.testing.assert_close(decoded, model.decode_first_stage(z), atol=1e-5, rtol=1e-5)


def test_half_export_keeps_the_schedule_fp32_and_samples_as_before(logdir, tmp_path):
    """--half rounds the weights only: the schedule buffers (and EMA decay) stay exact."""
    half = tmp_path / "half.safetensors"
    convert.main(["--ckpt", str(logdir), "--out", str(half), "--half"])
    source, exported = read_state_dict(logdir / "checkpoints" / "last.ckpt"), load_file(half)
    schedule = [k for k in source if "." not in k]  # LatentDiffusion's own buffers
    assert {"betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"} <= {*schedule}
    for key in [*schedule, "model_ema.decay"]:
        assert exported[key].dtype == source[key].dtype, key
        assert torch.equal(exported[key], source[key]), key
    assert exported["model.diffusion_model.out.2.weight"].dtype == torch.float16
    config = next((logdir / "configs").glob("*-project.yaml"))
    flags = [*FAST, "--n_samples", "2", "--n_iter", "1", "--skip_grid", "--skip_save"]
    before = txt2img.main(["--ckpt", str(logdir), *flags, "--outdir", str(tmp_path)])
    after = txt2img.main(
        ["--ckpt", str(half), "--config", str(config), *flags, "--outdir", str(tmp_path)]
    )
    model, _ = inference.load_model(half, config)
    assert torch.equal(model.alphas_cumprod, source["alphas_cumprod"])
    # fp16 weights move the pixels by a few 1e-3 (2.5e-3 here); fp16 schedules gave NaN
    torch.testing.assert_close(after[0], before[0], atol=HALF_ATOL, rtol=0)


# ---------------------------------------------------------------- unreadable and pickled files

TINY = ROOT / "configs" / "tiny" / "txt2img.yaml"
SCRIPTS = {
    "txt2img": txt2img.main,
    "img2img": img2img.main,
    "convert": convert.main,
    "evaluate": evaluate.main,
}


def reading(script: str, ckpt: Path, logdir: Path, out: Path, init_img: Path) -> list[str]:
    """A command line of `script` that reads the checkpoint `ckpt`."""
    sampling = f"--config {TINY} --outdir {out} --n_samples 1 --n_iter 1 --skip_grid"
    flags = {
        "txt2img": sampling,
        "img2img": f"{sampling} --init-img {init_img}",
        "convert": f"--config {TINY} --out {out / 'export.safetensors'}",
        "evaluate": f"--logdir {logdir} --outdir {out} --n_per_prompt 1 --steps 2",
    }[script]
    fast = FAST if script in ("txt2img", "img2img") else []
    return ["--ckpt", str(ckpt), *flags.split(), *fast]


def exits_in_one_line(capsys, fn, argv: list[str], *fragments: str) -> None:
    """`fn(argv)` exits non-zero with a one-line message that holds every fragment."""
    exits_with(capsys, fn, argv, *fragments)
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    assert "\n" not in str(exit_info.value.code)


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_names_an_unreadable_checkpoint(
    logdir, init_img, tmp_path, capsys, script, suffix
):
    ckpt = tmp_path / f"model{suffix}"
    save_checkpoint(read_state_dict(logdir / "checkpoints" / "last.ckpt"), ckpt)
    cut_in_half(ckpt)
    argv = reading(script, ckpt, logdir, tmp_path / "out", init_img)
    exits_in_one_line(capsys, SCRIPTS[script], argv, str(ckpt), "truncated or corrupt")


def test_convert_py_reports_a_bad_file_in_one_line(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    save_checkpoint({"w": torch.randn(64, 64)}, ckpt)
    script = str(ROOT / "scripts" / "convert.py")
    argv = ["--ckpt", str(cut_in_half(ckpt)), "--out", str(tmp_path / "x.ckpt")]
    result = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("convert.py: ") and str(ckpt) in line and "truncated or corrupt" in line


@pytest.mark.parametrize("script", ["convert", "txt2img", "evaluate"])
def test_a_pickled_checkpoint_needs_the_flag(logdir, init_img, tmp_path, capsys, script):
    last = logdir / "checkpoints" / "last.ckpt"
    weights = read_state_dict(last)
    ckpt = tmp_path / "compvis.ckpt"
    torch.save({"state_dict": weights, "hparams": argparse.Namespace(lr=1e-4)}, ckpt)
    argv = reading(script, ckpt, logdir, tmp_path / "out", init_img)
    exits_in_one_line(capsys, SCRIPTS[script], argv, str(ckpt), "--unsafe_pickle")
    result = SCRIPTS[script]([*argv, "--unsafe_pickle"])
    if script == "convert":
        exported = load_file(tmp_path / "out" / "export.safetensors")
        assert all(torch.equal(exported[k], v) for k, v in weights.items())
    elif script == "txt2img":
        plain = txt2img.main(reading(script, last, logdir, tmp_path / "plain", init_img))
        assert torch.equal(result[0], plain[0])
    else:
        plain = evaluate.main(reading(script, last, logdir, tmp_path / "plain", init_img))
        assert result["all"] == plain["all"] and result["n_images"] == plain["n_images"]


@pytest.mark.parametrize("sampler", ["--dpm", "--plms"])
def test_ddim_eta_with_a_deterministic_sampler_is_refused(logdir, tmp_path, capsys, sampler):
    argv = ["--ckpt", str(logdir), "--outdir", str(tmp_path), *FAST, sampler, "--ddim_eta", "0.5"]
    exits_with(capsys, txt2img.main, argv, "--ddim_eta 0.5", "DDIM")
