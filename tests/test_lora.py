"""LoRA: adapters in the kohya layout, parity with peft and diffusers, training and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_config, run_ddp
from omegaconf import OmegaConf
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from test_run_guarantees import TINY, assert_same_state, only_logdir, resume, train
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoint import CheckpointError, read_state_dict, save_checkpoint
from ldm.models.diffusion import adapters
from ldm.util import ConfigError, instantiate_from_config
from scripts import convert, txt2img

TE_ONLY = {"text_encoder": {"rank": 2, "alpha": 4, "targets": ["attn", "mlp"]}}
BOTH = {
    "unet": {"rank": 4, "targets": ["attn", "ff", "proj"], "learning_rate": 3e-4},
    "text_encoder": {"rank": 2, "alpha": 1, "learning_rate": 5e-5},
}


def tiny(lora_config=None, **params):
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(params)
    if lora_config is not None:
        config.params.lora_config = lora_config
    return instantiate_from_config(config)


def randomize_adapters(model, std: float = 0.1) -> None:
    """lora_up starts at zero; give every adapter a visible update."""
    with torch.no_grad():
        for p in model.lora.parameters():
            p.copy_(torch.randn_like(p) * std)


def pretrained(model):
    """A base with no zero-initialised layers (a fresh UNet's output conv is zero, so nothing
    upstream of it would get a gradient)."""
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


PROMPTS = ["a red circle", "a blue square on green"]


def with_peft_adapters(reference: CLIPTextModel, network) -> CLIPTextModel:
    """`reference` with peft's LoRA (rank 2, alpha 4) on the CLIP projections, holding the
    weights of our adapters, found by kohya's naming rule: lora_te_ + the transformers module
    path with dots as underscores."""
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    reference = inject_adapter_in_model(config, reference).eval()
    paths = {
        "lora_te_text_model_" + path.replace(".", "_"): path
        for path, _ in reference.named_modules()
    }
    assert set(network) <= set(paths)
    weights = {}
    for name, adapter in network.items():
        weights[f"{paths[name]}.lora_A.default.weight"] = adapter.lora_down.weight
        weights[f"{paths[name]}.lora_B.default.weight"] = adapter.lora_up.weight
    result = reference.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return reference


def test_text_encoder_adapters_match_peft_on_the_same_clip_model():
    model = tiny(TE_ONLY).eval()
    randomize_adapters(model)
    clip = model.cond_stage_model
    reference = CLIPTextModel(CLIPTextConfig(**clip.transformer.text_model.config.to_dict()))
    reference.load_state_dict(clip.transformer.text_model.state_dict())
    reference = with_peft_adapters(reference, model.lora)
    tokens = clip.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        plain = CLIPTextModel(CLIPTextConfig(**reference.config.to_dict()))
        plain.load_state_dict(clip.transformer.text_model.state_dict())
        before = plain(input_ids=tokens).last_hidden_state
        out = model.get_learned_conditioning(PROMPTS)
    assert (out - before).abs().max() > 1e-3  # the adapters change the output...
    assert (out - expected).abs().max() <= 1e-4  # ...exactly as peft's do


def test_a_lora_fine_tune_trains_only_the_adapters_each_part_at_its_own_rate():
    model = pretrained(tiny(BOTH))
    adapter_params = list(model.lora.parameters())
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(
        p.numel() for p in adapter_params
    )
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n]
    assert frozen == []
    names = list(model.lora)
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_") for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_") for n in names)
    groups = model.optimizer_groups()
    assert [g["lr"] for g in groups] == [3e-4, 5e-5]
    assert sum(len(g["params"]) for g in groups) == len(adapter_params)
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": PROMPTS}
    model.train()
    loss, _ = model.shared_step(batch)
    loss.backward()
    ups = [a.lora_up.weight.grad for a in model.lora.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)  # both parts get gradients


def test_the_ema_follows_the_adapters_not_the_frozen_base():
    model = tiny(TE_ONLY, use_ema=True)
    shadow = dict(model.model_ema.named_buffers())
    assert len(shadow) - 2 == len(list(model.lora.parameters()))  # + decay, num_updates
    randomize_adapters(model)
    with model.ema_scope():
        assert all((p == 0).all() for n, p in model.lora.named_parameters() if "lora_up" in n)


@pytest.mark.parametrize(
    "lora_config,message",
    [
        ({"unet": {"rank": 0}}, "rank 0"),
        ({"unet": {"rank": 2.5}}, "rank 2.5"),
        ({"unet": {"rank": 33}}, "rank 33 is larger than"),
        ({"unet": {"targets": ["attention"]}}, "targets"),
        ({"unet": {"rnak": 4}}, "unknown keys"),
        ({"vae": {"rank": 4}}, "expected parts"),
    ],
)
def test_bad_lora_configs_are_named(lora_config, message):
    with pytest.raises(ConfigError, match=message):
        tiny(lora_config)


def test_a_lora_file_that_matches_nothing_is_refused(tmp_path):
    model = tiny()
    path = tmp_path / "other.safetensors"
    save_checkpoint(
        {
            "lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 2),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="matches nothing"):
        adapters.load_lora_file(model, path)
    loha = tmp_path / "loha.safetensors"
    save_checkpoint({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, loha)
    with pytest.raises(CheckpointError, match="not in the kohya layout"):
        adapters.load_lora_file(model, loha)


UNET_ONLY = {"unet": {"rank": 4, "alpha": 2, "targets": ["attn", "ff", "proj"]}}


def test_an_exported_unet_lora_loads_in_diffusers_and_computes_the_same(tmp_path):
    from diffusers import StableDiffusionPipeline
    from test_unet import to_diffusers

    config = load_config("tiny/txt2img.yaml").model
    model = pretrained(tiny(UNET_ONLY)).eval()
    randomize_adapters(model)
    unet = model.model.diffusion_model
    model.lora.detach_hooks()  # the base alone, for the reference's weights
    reference = to_diffusers(config, unet)
    model.lora.attach(adapters.part_layers(model, "unet", UNET_ONLY["unet"]["targets"]))
    path = tmp_path / "adapter.safetensors"
    save_checkpoint(adapters.kohya_state_dict(model.lora), path)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reference)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        out = unet(x, t, context=context)
        model.lora.detach_hooks()
        base = unet(x, t, context=context)
    assert (out - base).abs().max() > 1e-3
    assert (out - expected).abs().max() <= 1e-4


LORA_ARGS = [
    "model.params.lora_config.unet.rank=4",
    "model.params.lora_config.text_encoder.rank=2",
    "data.params.batch_size=4",
    "data.params.num_workers=0",
    "lightning.trainer.limit_val_batches=1",
]


def base_file(tmp_path) -> Path:
    """A full tiny model file, as a user's pretrained model (EMA-only, as released SD files:
    the adapters train on its `model.*` weights, which is what other tools apply them to)."""
    model = pretrained(tiny(use_ema=False))
    path = tmp_path / "base.safetensors"
    save_checkpoint(model.state_dict(), path)
    return path


def adapter_count(state_dict) -> int:
    return sum(
        v.numel() for k, v in state_dict.items() if k.startswith("lora.") and "alpha" not in k
    )


@pytest.mark.slow
def test_a_lora_fine_tune_through_main_keeps_small_checkpoints_and_resumes_exactly(tmp_path):
    base = base_file(tmp_path)
    args = ["--finetune_from", str(base), *LORA_ARGS]
    whole = train(tmp_path / "whole", "--max_steps", "4", *args)
    train(tmp_path / "parts", "--max_steps", "2", *args)
    logdir = only_logdir(tmp_path / "parts")
    resumed = resume(logdir, "--max_steps", "4")
    assert resumed.global_step == 4
    ours, reference = resumed.lightning_module, whole.lightning_module
    assert_same_state(ours.state_dict(), reference.state_dict())
    base_weights = read_state_dict(base)
    for key, value in ours.state_dict().items():
        if key.startswith(("model.", "cond_stage_model.", "first_stage_model.")):
            assert torch.equal(value, base_weights[key]), key  # the base never moves
    trained = [
        k for k, v in ours.state_dict().items() if k.startswith("lora.") and "alpha" not in k
    ]
    assert len(trained) == len(list(ours.lora.parameters()))
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(
        k.startswith(("lora.", "model_ema.", "scale_factor")) for k in checkpoint["state_dict"]
    )
    assert adapter_count(checkpoint["state_dict"]) == sum(p.numel() for p in ours.lora.parameters())
    size = (logdir / "checkpoints" / "last.ckpt").stat().st_size
    assert size < base.stat().st_size / 4  # adapters + their EMA + optimizer state only
    assert not torch.equal(  # and they trained
        checkpoint["state_dict"][next(k for k in trained if "lora_up" in k)],
        torch.zeros_like(ours.state_dict()[next(k for k in trained if "lora_up" in k)]),
    )


@pytest.mark.slow
def test_a_lora_fine_tune_runs_under_two_process_ddp(tmp_path):
    base = base_file(tmp_path)
    args = ["--base", str(TINY), "-l", str(tmp_path / "logs"), "--max_steps", "2"]
    result = run_ddp(tmp_path, *args, "--finetune_from", str(base), *LORA_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    logdir = only_logdir(tmp_path / "logs")
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(
        k.startswith(("lora.", "model_ema.", "scale_factor")) for k in checkpoint["state_dict"]
    )


LOCON = {
    "unet": {"rank": 2, "alpha": 3, "targets": ["attn", "ff", "proj", "conv"]},
    "text_encoder": {"rank": 2},
}


def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        c = model.get_learned_conditioning(PROMPTS)
        return model.apply_model(z, torch.tensor([10, 700]), c)


def test_merging_equals_the_adapters_applied_at_run_time_locon_included():
    model = pretrained(tiny(LOCON, use_ema=False)).eval()
    assert any("resnets_0_conv1" in name for name in model.lora)  # LoCon on the ResBlocks
    randomize_adapters(model)
    hooked = outputs(model)
    merged = adapters.merged_state_dict(model)
    assert not any(k.startswith("lora.") for k in merged)
    plain = tiny(use_ema=False).eval()
    plain.load_state_dict(merged)
    assert (hooked - outputs(pretrained(tiny(use_ema=False)).eval())).abs().max() > 1e-3
    torch.testing.assert_close(outputs(plain), hooked, atol=1e-5, rtol=1e-5)


def kohya_file(path, layers: dict[str, tuple[int, int]], rank: int = 2, alpha: float = 1.0):
    """A LoRA file as other tools write it, from the documented key names alone."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (out_features, in_features) in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_checkpoint(tensors, path)
    return tensors


def test_a_kohya_file_from_another_tool_merges_by_its_closed_form(tmp_path):
    model = tiny(use_ema=False).eval()
    q = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_q
    fc1 = model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1
    old = "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k"  # the older naming
    k = model.model.diffusion_model.output_blocks[0][1].transformer_blocks[0].attn1.to_k
    names = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q": q,
        "lora_te_text_model_encoder_layers_0_mlp_fc1": fc1,
        old: k,
    }
    before = {name: layer.weight.detach().clone() for name, layer in names.items()}
    tensors = kohya_file(
        tmp_path / "other.safetensors", {n: tuple(m.weight.shape) for n, m in names.items()}
    )
    assert adapters.load_lora_file(model, tmp_path / "other.safetensors", 0.5) == 3
    for name, layer in names.items():
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        expected = before[name] + 0.5 * (1.0 / 2) * up @ down  # multiplier * alpha / rank
        torch.testing.assert_close(layer.weight, expected)


def test_a_lora_rank_that_does_not_fit_its_layer_is_named(tmp_path):
    model = tiny(use_ema=False)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    kohya_file(tmp_path / "wrong.safetensors", {name: (7, 5)})
    with pytest.raises(CheckpointError, match=f"{name} does not fit"):
        adapters.load_lora_file(model, tmp_path / "wrong.safetensors")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a LoRA run's log dir after 3 steps, the base file it fine-tuned)."""
    root = tmp_path_factory.mktemp("lora")
    base = base_file(root)
    train(root / "logs", "--finetune_from", str(base), "--max_steps", "3", *LORA_ARGS)
    return only_logdir(root / "logs"), base


def txt2img_pixels(ckpt: Path, out: Path, *extra: str) -> np.ndarray:
    flags = ["--ddim_steps", "3", "--precision", "full", "--device", "cpu", "--n_samples", "2"]
    txt2img.main(["--ckpt", str(ckpt), "--outdir", str(out), *flags, "--skip_grid", *extra])
    return np.stack([np.asarray(Image.open(p), np.int16) for p in sorted(out.glob("samples/*"))])


def test_a_lora_run_exports_its_adapter_and_a_merged_model_that_sample_alike(lora_run, tmp_path):
    logdir, base = lora_run
    config = str(TINY)
    run = txt2img_pixels(logdir, tmp_path / "run")
    assert np.abs(run - txt2img_pixels(base, tmp_path / "base", "--config", config)).max() > 0
    adapter = tmp_path / "adapter.safetensors"
    convert.main(["--ckpt", str(logdir), "--adapter", "--use_ema", "--out", str(adapter)])
    keys = set(read_state_dict(adapter))
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    merged = tmp_path / "merged.safetensors"
    convert.main(["--ckpt", str(logdir), "--use_ema", "--out", str(merged)])
    assert not any(k.startswith("lora") for k in read_state_dict(merged))
    from_merged = txt2img_pixels(merged, tmp_path / "merged", "--config", config)
    with_file = txt2img_pixels(base, tmp_path / "file", "--config", config, "--lora", str(adapter))
    assert np.abs(from_merged - run).max() <= 2  # uint8 rounding of equal math
    assert np.abs(with_file - run).max() <= 2
    half = txt2img_pixels(base, tmp_path / "half", "--config", config, "--lora", f"{adapter}:0")
    assert np.array_equal(half, txt2img_pixels(base, tmp_path / "b2", "--config", config))


def test_convert_adapter_of_a_full_run_says_there_is_none(tmp_path, capsys):
    path = base_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--ckpt", str(path), "--adapter", "--out", str(tmp_path / "x.safetensors")])
    assert "holds no LoRA adapters" in str(exit_info.value.code)


def test_a_base_file_with_its_own_unet_ema_loads_its_weights_under_lora(tmp_path):
    source = pretrained(tiny(use_ema=True))
    path = tmp_path / "full-ema.safetensors"
    save_checkpoint(source.state_dict(), path)
    model = tiny(TE_ONLY, ckpt_path=str(path))
    for key, value in source.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key


def test_the_lora_overlay_on_the_v1_finetune_config_adapts_sd_v1():
    config = OmegaConf.merge(
        load_config("stable-diffusion/v1-finetune.yaml"), load_config("stable-diffusion/lora.yaml")
    )
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    unet = [n for n in model.lora if n.startswith("lora_unet_")]
    te = [n for n in model.lora if n.startswith("lora_te_")]
    assert len(unet) == 16 * 12 and len(te) == 12 * 6  # 16 transformers x (8 attn, 2 ff, 2 proj)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in unet
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(
        p.numel() for p in model.lora.parameters()
    )
    shadow = [n for n, _ in model.model_ema.named_buffers() if n not in ("decay", "num_updates")]
    assert len(shadow) == len(list(model.lora.parameters()))  # the EMA follows the adapters


def test_adapters_train_under_gradient_checkpointing_and_bf16_autocast():
    config = load_config("tiny/txt2img.yaml").model
    config.params.unet_config.params.use_checkpoint = True
    config.params.lora_config = BOTH
    model = pretrained(instantiate_from_config(config)).train()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": PROMPTS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.shared_step(batch)
    loss.backward()
    grads = [a.lora_up.weight.grad for a in model.lora.values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_sd2_text_encoder_adapters_match_peft_on_its_transformers_conversion():
    """OpenCLIP's fused attention gets its q, k, v and out adapters as weight updates; peft on
    the CLIPTextModel diffusers converts it to (kohya's names come from that model)."""
    from test_diffusers_format import TINY_OPENCLIP, diffusers_sd2_text_encoder

    openclip = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": TINY_OPENCLIP, "layer": "penultimate"},
    }
    model = tiny({"text_encoder": {"rank": 2, "alpha": 4}}, cond_stage_config=openclip).eval()
    clip = model.cond_stage_model
    model.lora.detach_hooks()
    reference = diffusers_sd2_text_encoder(clip)  # from the base weights
    model.lora.attach(adapters.part_layers(model, "text_encoder", ["attn", "mlp"]))
    randomize_adapters(model)
    reference = with_peft_adapters(reference, model.lora)  # kohya's SD 2 names: they all exist
    tokens = clip.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        out = model.get_learned_conditioning(PROMPTS)
        model.lora.detach_hooks()
        base = model.get_learned_conditioning(PROMPTS)
    assert (out - base).abs().max() > 1e-3
    assert (out - expected).abs().max() <= 1e-4
    assert set(clip.state_dict()) == set(
        tiny(cond_stage_config=openclip).cond_stage_model.state_dict()
    )


def test_sd2_text_encoder_adapters_train_and_merge_into_the_fused_weights():
    from test_diffusers_format import TINY_OPENCLIP

    openclip = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": TINY_OPENCLIP, "layer": "penultimate"},
    }
    model = pretrained(
        tiny({"text_encoder": {"rank": 2}}, cond_stage_config=openclip, use_ema=False)
    )
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": PROMPTS}
    model.train()
    model.shared_step(batch)[0].backward()
    q = [a for n, a in model.lora.items() if n.endswith("self_attn_q_proj")]
    assert q and all(a.lora_up.weight.grad.abs().sum() > 0 for a in q)
    model.eval()
    randomize_adapters(model)
    hooked = outputs(model)
    plain = tiny(cond_stage_config=openclip, use_ema=False).eval()
    plain.load_state_dict(adapters.merged_state_dict(model))
    torch.testing.assert_close(outputs(plain), hooked, atol=1e-5, rtol=1e-5)
