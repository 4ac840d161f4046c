"""instantiate_from_config: original semantics and errors that name the problem."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler2
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config


def test_builds_target_with_params_from_omegaconf():
    config = OmegaConf.create(
        {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}}
    )
    layer = instantiate_from_config(config)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (2, 3)


def test_sentinels_give_none():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None


def test_base_learning_rate_may_sit_beside_target():
    config = {"target": "torch.nn.Identity", "base_learning_rate": 1e-4}
    assert isinstance(instantiate_from_config(config), torch.nn.Identity)


def test_get_obj_from_str():
    assert get_obj_from_str("torch.nn.Linear") is torch.nn.Linear


@pytest.mark.parametrize(
    "config,message",
    [
        ({"params": {"a": 1}}, "no 'target' key"),
        ({"target": "ldm.nothing_here.Model"}, "cannot import module 'ldm.nothing_here'"),
        ({"target": "torch.nn.NoSuchLayer"}, "has no attribute 'NoSuchLayer'"),
        ({"target": "Linear"}, "not a dotted path"),
        (
            {
                "target": "torch.nn.Linear",
                "params": {"in_features": 1, "out_features": 1, "bais": 1},
            },
            r"'torch.nn.Linear' does not accept params \['bais'\]",
        ),
        (
            {"target": "torch.nn.Linear", "params": {"in_features": 1}},
            r"needs params \['out_features'\]",
        ),
        ({"target": "torch.nn.Identity", "parms": {}}, r"unexpected keys \['parms'\]"),
        (["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_bad_configs_name_the_problem(config, message):
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(config)


def test_unknown_param_of_a_subclass_is_caught_through_kwargs():
    """LatentDiffusion passes **kwargs on to DDPM; a typo must still be named up front."""
    config = OmegaConf.load("configs/tiny/txt2img.yaml").model
    config.params.linear_strat = 0.001
    with pytest.raises(
        ConfigError, match=r"LatentDiffusion' does not accept params \['linear_strat'\]"
    ):
        instantiate_from_config(config)


def test_lambda_linear_scheduler_warms_up_then_decays_per_cycle():
    """The original: f_min + (f_max - f_min) * (cycle_length - n) / cycle_length after warm-up,
    n counted from the cycle start, so f_min comes exactly at the end of each cycle."""
    schedule = LambdaLinearScheduler(
        warm_up_steps=[10, 0],
        f_start=[0.0, 1.0],
        f_max=[1.0, 1.0],
        f_min=[0.5, 0.0],
        cycle_lengths=[100, 50],
    )
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    for n in (10, 40, 77, 100):
        assert schedule(n) == pytest.approx(0.5 + 0.5 * (100 - n) / 100), n
    assert schedule(100) == pytest.approx(0.5)  # the last step of cycle 0 reaches its f_min
    assert schedule(101) == pytest.approx(1.0 * 49 / 50)  # cycle 1: no warm-up, 1 -> 0
    assert schedule(125) == pytest.approx(0.5)
    assert schedule(150) == pytest.approx(0.0)


def cosine_closed_form(n: int, warm_up: int, length: int, f_min: float, f_max: float) -> float:
    """The original's decay: the cosine runs over the cycle_length - warm_up steps after warm-up."""
    t = min((n - warm_up) / (length - warm_up), 1.0)
    return f_min + 0.5 * (f_max - f_min) * (1 + math.cos(t * math.pi))


def test_cosine_scheduler_follows_the_original_closed_form():
    schedule = LambdaWarmUpCosineScheduler2(
        warm_up_steps=[10, 20],
        f_start=[0.0, 0.2],
        f_max=[1.0, 0.8],
        f_min=[0.1, 0.05],
        cycle_lengths=[110, 220],
    )
    assert schedule(5) == pytest.approx(0.5)  # linear warm-up
    assert schedule(10) == pytest.approx(1.0)  # f_max right after warm-up
    assert schedule(60) == pytest.approx(0.1 + 0.5 * (1.0 - 0.1))  # the midpoint of the decay
    assert schedule(110) == pytest.approx(0.1)  # f_min exactly at the cycle end
    assert schedule(110 + 20) == pytest.approx(0.8)  # cycle 1 after its own warm-up
    assert schedule(110 + 120) == pytest.approx(0.05 + 0.5 * (0.8 - 0.05))
    assert schedule(330) == pytest.approx(0.05)
    assert schedule(400) == pytest.approx(0.05)  # past the last cycle: stays at f_min
    for n in range(10, 111, 7):
        assert schedule(n) == pytest.approx(cosine_closed_form(n, 10, 110, 0.1, 1.0)), n


def test_scheduler_rejects_mismatched_cycle_lists():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(
            warm_up_steps=[1, 2], f_start=[0], f_max=[1], f_min=[1], cycle_lengths=[5]
        )
