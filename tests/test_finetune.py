"""The SD v1 fine-tuning config and the optimizer option it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_config, sd_manifest
from PIL import Image

from ldm.models.diffusion.ddpm import make_optimizer
from ldm.util import ConfigError, instantiate_from_config


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
