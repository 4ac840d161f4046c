"""The SD v1 fine-tuning config and the optimizer option it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, load_config, sd_manifest
from PIL import Image

from ldm.checkpoint import CheckpointError, read_state_dict, save_checkpoint
from ldm.util import ConfigError, instantiate_from_config, make_optimizer


def test_v1_finetune_config_is_sd_v1_with_ema_checkpointing_and_adamw():
    config = load_config("stable-diffusion/v1-finetune.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plain = {k: v for k, v in keys.items() if not k.startswith("model_ema.")}
    assert plain == sd_manifest("v1")  # loads an original v1 file key for key
    assert len(keys) - len(plain) > 600  # and keeps an EMA copy, as SD training did
    assert model.model.diffusion_model.block_kwargs["use_checkpoint"]
    assert model.ucg_training["caption"]["p"] == 0.1
    optimizer, schedulers = model.configure_optimizers()
    (optimizer,) = optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["weight_decay"] == 0.01
    lr_lambda = schedulers[0]["scheduler"].lr_lambdas[0]
    assert lr_lambda(0) < 1e-3 and lr_lambda(1000) == pytest.approx(1.0)  # 1000-step warm-up
    assert config.lightning.trainer.precision == "bf16-mixed"


def test_v1_finetune_data_reads_an_image_caption_folder(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((600, 520, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    config = load_config("stable-diffusion/v1-finetune.yaml").data.params.train
    config.params.root = str(tmp_path)
    item = instantiate_from_config(config)[0]
    assert item["image"].shape == (512, 512, 3) and item["caption"] == "caption 0"


def test_optimizer_config_picks_the_class_and_names_mistakes():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(None, params, 1e-4), torch.optim.AdamW)
    sgd = make_optimizer({"target": "torch.optim.SGD", "params": {"momentum": 0.9}}, params, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.1
    with pytest.raises(ConfigError, match="torch.optim.SGD.*momentom"):
        make_optimizer({"target": "torch.optim.SGD", "params": {"momentom": 0.9}}, params, 0.1)
    with pytest.raises(ConfigError, match="needs a 'target'"):
        make_optimizer({"params": {}}, params, 0.1)


def test_eight_bit_adamw_without_bitsandbytes_says_what_is_missing():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        params = [torch.nn.Parameter(torch.zeros(3))]
        with pytest.raises(ConfigError, match="bitsandbytes"):
            make_optimizer({"target": "bitsandbytes.optim.AdamW8bit"}, params, 1e-4)
    else:
        pytest.skip("bitsandbytes is installed: the 8-bit optimizer needs CUDA to be checked")


# ------------------------------------------------ fine-tuning from a real SD file's layout


def run_main(tmp_path, *args: str):
    """main.py on the tiny txt2img config: one step at learning rate 0 (weights stay put)."""
    import main

    base = ["--base", str(ROOT / "configs" / "tiny" / "txt2img.yaml"), "-l", str(tmp_path), "-t"]
    small = ["--max_steps", "1", "--no-test", "data.params.batch_size=4"]
    small += ["data.params.num_workers=0", "lightning.trainer.limit_val_batches=0"]
    small += ["model.base_learning_rate=0"]
    return main.main([*base, *small, *args]).lightning_module


def sd_file_with_ema(path, scale_factor: float = 0.123):
    """A tiny model saved as an original SD file whose EMA is not its weights (v1-5-pruned's
    kind: model_ema.* after many updates), with a stored scale_factor."""
    model = instantiate_from_config(load_config("tiny/txt2img.yaml").model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
        for name, buffer in model.model_ema.named_buffers():
            if buffer.is_floating_point() and name != "decay":
                buffer.normal_(0, 0.05)
        model.model_ema.num_updates.fill_(470000)
        model.scale_factor.fill_(scale_factor)
    save_checkpoint(model.state_dict(), path)
    return read_state_dict(path)


def test_finetuning_an_sd_file_with_ema_restarts_the_ema_from_its_weights(tmp_path):
    path = tmp_path / "sd.safetensors"
    source = sd_file_with_ema(path)
    model = run_main(tmp_path / "logs", "--finetune_from", str(path))
    assert model.model_ema.num_updates.item() == 1  # one optimizer step since the start
    with model.ema_scope():  # lr 0: the EMA is the file's weights, not the file's EMA
        for key, value in model.model.state_dict().items():
            torch.testing.assert_close(value, source[f"model.{key}"], msg=key)


def test_keep_ckpt_ema_continues_the_files_ema(tmp_path):
    path = tmp_path / "sd.safetensors"
    source = sd_file_with_ema(path)
    model = run_main(
        tmp_path / "logs", "--finetune_from", str(path), "model.params.keep_ckpt_ema=true"
    )
    assert model.model_ema.num_updates.item() == 470001
    key = "model_ema.diffusion_modelout2weight"
    assert not torch.equal(source[key], source["model.diffusion_model.out.2.weight"])
    torch.testing.assert_close(model.state_dict()[key], source[key], atol=1e-3, rtol=0)


def test_finetune_from_keeps_the_files_scale_factor(tmp_path):
    path = tmp_path / "sd.safetensors"
    sd_file_with_ema(path, scale_factor=0.123)  # far from 1 / std of these latents
    model = run_main(tmp_path / "logs", "--finetune_from", str(path))
    assert model.scale_factor.item() == pytest.approx(0.123)
    fresh = run_main(tmp_path / "fresh")  # without a file, scale_by_std measures the data
    assert fresh.scale_factor.item() != pytest.approx(0.123, abs=0.05)


def diffusers_layout_file(path) -> None:
    """A file with diffusers' UNet2DConditionModel keys, as `unet/diffusion_pytorch_model`."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        layers_per_block=1,
        norm_num_groups=32,
        attention_head_dim=4,
    )
    save_checkpoint(unet.state_dict(), path)


@pytest.mark.parametrize(
    "make, fragments",
    [
        (
            diffusers_layout_file,
            ["diffusers", "conv_in.weight", "missing (", "unexpected (", "model.diffusion_model"],
        ),
        (
            lambda p: save_checkpoint(
                instantiate_from_config(load_config("tiny/autoencoder.yaml").model).state_dict(),
                p,
            ),
            ["autoencoder", "encoder.", "missing (", "model.diffusion_model"],
        ),
    ],
    ids=["diffusers-unet", "autoencoder"],
)
def test_a_file_of_another_layout_is_refused_at_start_up(tmp_path, make, fragments):
    path = tmp_path / "other.safetensors"
    make(path)
    with pytest.raises(CheckpointError) as info:
        run_main(tmp_path / "logs", "--finetune_from", str(path))
    message = str(info.value)
    for fragment in ["other.safetensors", *fragments]:
        assert fragment in message, message


def test_missing_weights_are_refused_unless_ignored(tmp_path):
    path = tmp_path / "no-vae.safetensors"
    source = sd_file_with_ema(tmp_path / "sd.safetensors")
    save_checkpoint({k: v for k, v in source.items() if not k.startswith("first_stage")}, path)
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): first_stage_model\."):
        run_main(tmp_path / "a", "--finetune_from", str(path))
    model = run_main(
        tmp_path / "b",
        "--finetune_from",
        str(path),
        "model.params.ignore_keys=[first_stage_model.]",
    )
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], source[key])


def test_load_only_unet_takes_the_unet_of_a_full_sd_file(tmp_path):
    path = tmp_path / "sd.safetensors"
    source = sd_file_with_ema(path)
    model = run_main(
        tmp_path / "logs", f"model.params.ckpt_path={path}", "model.params.load_only_unet=true"
    )
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, source[f"model.{key}"]), key
    vae_key = "first_stage_model.decoder.conv_out.weight"
    assert not torch.equal(model.state_dict()[vae_key], source[vae_key])
