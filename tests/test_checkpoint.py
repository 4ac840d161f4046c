"""Checkpoint files: round trips, SD legacy keys, EMA keys, clear errors for bad files."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch
from conftest import ROOT, load_config
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.callbacks import AtomicCheckpointIO
from ldm.checkpoint import (
    BEST_CHECKPOINT,
    EMA_PREFIX,
    STEP_CHECKPOINT,
    CheckpointError,
    config_dir,
    config_names,
    ema_buffer_name,
    ema_key,
    filter_keys,
    last_checkpoint,
    load_weights,
    read_state_dict,
    run_configs,
    run_files,
    save_checkpoint,
    step_checkpoints,
    swap_in_ema,
)
from ldm.inference import load_model
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def tiny(**params):
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(params)
    return instantiate_from_config(config).eval()


def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red circle", "a blue square"])
        return model.decode_first_stage(model.apply_model(z, torch.tensor([10, 700]), c))


def perturbed(model):
    """Non-default values everywhere, so a load that skipped a tensor shows up."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, suffix):
    model = perturbed(tiny())
    path = tmp_path / f"model{suffix}"
    save_checkpoint(model.state_dict(), path)
    restored = tiny(ckpt_path=str(path), keep_ckpt_ema=True)
    assert torch.equal(outputs(model), outputs(restored))
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


class WithHead(LatentDiffusion):
    """A subclass that builds a module of its own after LatentDiffusion's, as inpainting does."""

    def __init__(self, **params):
        super().__init__(**params)
        self.head = torch.nn.Linear(2, 2)


def test_ckpt_path_loads_after_the_outermost_constructor_has_built_everything(tmp_path):
    params = OmegaConf.to_container(load_config("tiny/txt2img.yaml").model.params)
    source = perturbed(WithHead(**params))
    path = tmp_path / "with_head.safetensors"
    save_checkpoint(source.state_dict(), path)
    restored = WithHead(**params, ckpt_path=str(path), keep_ckpt_ema=True)
    assert torch.equal(restored.head.weight, source.head.weight)
    assert torch.equal(outputs(restored.eval()), outputs(source.eval()))


def test_step_checkpoints_are_the_files_model_checkpoint_names_in_step_order(tmp_path):
    names = ModelCheckpoint(filename=STEP_CHECKPOINT).format_checkpoint_name
    best = ModelCheckpoint(filename=BEST_CHECKPOINT).format_checkpoint_name
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    steps = [(0, 999_999_999), (0, 10), (3, 1_000_000_000), (0, 9)]
    for epoch, step in steps:
        (folder / names({"epoch": epoch, "step": step})).touch()
    (folder / best({"epoch": 0, "step": 10})).touch()
    (folder / "last.ckpt").touch()
    found = step_checkpoints(tmp_path)
    assert [step for step, _ in found] == sorted(step for _, step in steps)
    assert all(path.name.startswith("epoch=") for _, path in found)


def test_ckpt_layout_is_nested_under_state_dict_and_safetensors_is_flat(tmp_path):
    state_dict = {"a.weight": torch.ones(2)}
    save_checkpoint(state_dict, tmp_path / "m.ckpt", extra={"global_step": 7})
    raw = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert set(raw) == {"state_dict", "global_step"} and torch.equal(
        raw["state_dict"]["a.weight"], torch.ones(2)
    )
    save_checkpoint(state_dict, tmp_path / "m.safetensors")
    assert set(read_state_dict(tmp_path / "m.safetensors")) == {"a.weight"}


def test_original_sd_extras_load_without_complaint(tmp_path):
    """SD files carry CLIP position_ids and an EMA copy; a model without EMA loads them."""
    source = perturbed(tiny(use_ema=True))
    state_dict = dict(source.state_dict())
    state_dict[POSITION_IDS] = torch.arange(77)[None]
    path = tmp_path / "sd.safetensors"
    save_checkpoint(state_dict, path)
    model = tiny(use_ema=False)
    missing, unexpected = load_weights(model, path, strict=True)
    assert missing == [] and unexpected == []
    assert torch.equal(outputs(model), outputs(source))


def test_ema_weights_round_trip_and_restart_from_weights_when_absent(tmp_path):
    source = perturbed(tiny(use_ema=True))
    source.model_ema(source.model)
    path = tmp_path / "ema.ckpt"
    save_checkpoint(source.state_dict(), path)
    restored = tiny(use_ema=True, ckpt_path=str(path), keep_ckpt_ema=True)
    assert restored.model_ema.num_updates.item() == 1
    fine_tune = tiny(use_ema=True, ckpt_path=str(path))  # by default the EMA restarts
    assert fine_tune.model_ema.num_updates.item() == 0
    no_ema = tmp_path / "no_ema.ckpt"
    save_checkpoint({k: v for k, v in source.state_dict().items() if "model_ema" not in k}, no_ema)
    restarted = tiny(use_ema=True, ckpt_path=str(no_ema))
    with restarted.ema_scope():
        assert torch.equal(outputs(restarted), outputs(source))


def test_mismatched_files_name_the_keys(tmp_path):
    model = tiny()
    state_dict = dict(model.state_dict())
    del state_dict["model.diffusion_model.out.2.bias"]
    state_dict["model.diffusion_model.extra.weight"] = torch.zeros(1)
    state_dict["model.diffusion_model.time_embed.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(state_dict, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny(), path)
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "missing (1): model.diffusion_model.out.2.bias" in message
    assert "unexpected (1): model.diffusion_model.extra.weight" in message
    assert "model.diffusion_model.time_embed.0.weight: file (3, 3) vs model (128, 32)" in message


def test_wrong_shapes_fail_even_when_not_strict(tmp_path):
    state_dict = {"model.diffusion_model.time_embed.0.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_weights(tiny(), state_dict, strict=False)


def test_ignore_keys_drops_prefixes(tmp_path):
    model = tiny()
    state_dict = {
        k: v for k, v in model.state_dict().items() if not k.startswith("first_stage_model.")
    }
    state_dict["first_stage_model.stale"] = torch.zeros(1)
    missing, _ = load_weights(tiny(), state_dict, ignore_keys=["first_stage_model."], strict=False)
    assert missing and all(k.startswith("first_stage_model.") for k in missing)


def test_pickled_objects_need_an_explicit_opt_in(tmp_path):
    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="unsafe_pickle=True"):
        read_state_dict(path)
    assert set(read_state_dict(path, unsafe_pickle=True)) == {"w"}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.ckpt' does not exist"):
        read_state_dict(tmp_path / "nowhere.ckpt")


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.ones(1)}, path)
    with pytest.raises(AttributeError):
        save_checkpoint({"w": "not a tensor"}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def truncated(path, fraction: float = 0.5):
    """`path` cut to `fraction` of its bytes, as a copy killed mid-transfer leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_files_are_named_and_called_truncated_or_corrupt(tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    save_checkpoint({"w": torch.randn(64, 64)}, path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        truncated(path)
    else:
        path.write_bytes(b"not a checkpoint at all " * 40)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert "\n" not in message


def test_the_pickle_refusal_names_the_flag_and_the_object(tmp_path):
    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "--unsafe_pickle" in message
    assert "argparse.Namespace" in message and "\n" not in message


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    """The process umask set to the parameter for the test, restored after."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_checkpoints_get_the_permissions_of_a_plain_file(tmp_path, umask, suffix):
    plain = tmp_path / "plain.txt"
    plain.write_text("reference")
    path = tmp_path / f"model{suffix}"
    save_checkpoint({"w": torch.ones(2)}, path)
    lightning = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, lightning)
    expected = 0o666 & ~umask
    for written in (plain, path, lightning):
        assert stat.S_IMODE(written.stat().st_mode) == expected, (written, oct(umask))
    assert umask != 0o022 or expected == 0o644


# ---------------------------------------------------------------- EMA keys and run dirs


def test_the_ema_key_rule_is_the_one_litema_and_the_swap_use():
    model = perturbed(tiny())  # the EMA buffers keep the weights as built: EMA != raw
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    tracked = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert model.model_ema.m_name2s_name == {n: ema_buffer_name(n) for n in tracked}
    buffers = {k for k in state_dict if k.startswith(EMA_PREFIX)}
    keys = {ema_key("model." + n): "model." + n for n in tracked}
    assert len(keys) == len(tracked)  # no two parameters share a buffer name
    assert set(keys) == buffers - {EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}
    swapped, has_ema = swap_in_ema(state_dict)
    model.model_ema.copy_to(model.model)
    expected = filter_keys(model.state_dict(), [EMA_PREFIX])
    assert has_ema and swapped.keys() == expected.keys()
    assert all(torch.equal(swapped[k], v) for k, v in expected.items())
    assert not all(torch.equal(state_dict[k], expected[k]) for k in keys.values())


def fake_run(logdir, model):
    """A main.py log dir as SetupCallback and the checkpoint callbacks lay it out."""
    config_dir(logdir).mkdir(parents=True)
    project, _ = config_names("2026-01-01T00-00-00")
    (config_dir(logdir) / project).write_text((ROOT / "configs/tiny/txt2img.yaml").read_text())
    save_checkpoint(model.state_dict(), last_checkpoint(logdir))
    return logdir


def test_a_run_dir_loads_as_its_last_ckpt_with_its_config(tmp_path):
    logdir = fake_run(tmp_path / "run", perturbed(tiny()))
    configs = run_configs(logdir)
    assert run_files(logdir) == (configs, last_checkpoint(logdir))
    assert run_files(last_checkpoint(logdir)) == (configs, last_checkpoint(logdir))
    outside = tmp_path / "model.ckpt"
    outside.write_bytes(last_checkpoint(logdir).read_bytes())
    assert run_files(outside) == ([], outside)
    models = [
        load_model(logdir),
        load_model(last_checkpoint(logdir)),
        load_model(outside, configs),
        load_model(str(outside), str(configs[0])),
    ]
    (reference, config), *others = models
    for model, other_config in others:
        assert other_config == config and model.state_dict().keys() == reference.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.state_dict().items())
    with pytest.raises(CheckpointError, match="configs/\\*-project.yaml"):
        run_files(tmp_path)


def test_the_loaded_ema_weights_are_those_ema_scope_samples_with(tmp_path):
    """evaluate.py samples a run with load_model's swapped-in EMA weights: exactly what the
    full model (model_ema kept) gives under ema_scope."""
    trained = perturbed(tiny())
    logdir = fake_run(tmp_path / "run", trained)
    loaded, _ = load_model(logdir)
    assert not hasattr(loaded, "model_ema")
    with trained.ema_scope():
        expected = outputs(trained)
    assert torch.equal(outputs(loaded), expected)
    assert not torch.equal(outputs(trained), expected)
