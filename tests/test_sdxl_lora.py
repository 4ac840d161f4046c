"""LoRA of SDXL: adapters on the UNet and both text encoders in kohya's SDXL layout
(`lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…`), which diffusers' SDXL pipeline loads
and computes the same with; training through main.py; the file merges back through `--lora`."""

from __future__ import annotations

import open_clip
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from test_lora import randomize_adapters
from test_sdxl_conditioner import PROMPTS
from test_sdxl_engine import diffusers_unet, run, shapes_batch, tiny_engine
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.checkpoint import read_state_dict, save_checkpoint
from ldm.models.diffusion import adapters
from ldm.modules.encoders.modules import CLIP_CONFIGS, CLIP_SHARED
from scripts import convert

LORA = {"unet": {"rank": 4}, "text_encoder": {"rank": 2}}
TINY_BIGG_TEXT = dict(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=3,
    projection_dim=48,
    hidden_act="gelu",
)


def diffusers_text_encoders(engine) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """diffusers' text_encoder and text_encoder_2 from the engine's base weights."""
    checkpoint = {"conditioner." + k: v for k, v in engine.conditioner.state_dict().items()}
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS["ldm/clip-tiny"]))
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint, "conditioner.embedders.0.transformer.")
    te1.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**(CLIP_SHARED | TINY_BIGG_TEXT)))
    converted = sfu.convert_open_clip_checkpoint(te2, checkpoint, "conditioner.embedders.1.model.")
    result = te2.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and not [
        k for k in result.missing_keys if "position" not in k
    ]
    return te1.eval(), te2.eval()


def test_sdxl_lora_names_are_kohyas_sdxl_layout():
    engine = tiny_engine(use_ema=False, lora_config=LORA)
    names = list(engine.lora.keys())
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k" in names  # depth 2 there
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    # The pooled vector comes from bigG's last block: it is adapted too.
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in names


def test_an_exported_sdxl_lora_loads_in_diffusers_sdxl_and_computes_the_same(tmp_path):
    engine = tiny_engine(use_ema=False, lora_config=LORA).eval()
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomize_adapters(engine)
    engine.lora.detach_hooks()  # the base alone, for the references' weights
    unet, (te1, te2) = diffusers_unet(engine), diffusers_text_encoders(engine)
    engine.lora.attach(adapters.all_layers(engine))
    path = tmp_path / "sdxl-lora.safetensors"
    save_checkpoint(adapters.kohya_state_dict(engine.lora), path)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(path), unet_config=unet.config
    )
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet)
    StableDiffusionXLPipeline.load_lora_into_text_encoder(state_dict, alphas, te1, "text_encoder")
    StableDiffusionXLPipeline.load_lora_into_text_encoder(state_dict, alphas, te2, "text_encoder_2")
    conditioner = engine.conditioner
    with torch.no_grad():
        clip_ids = conditioner.embedders[0].tokenize(PROMPTS)
        expected_1 = te1(input_ids=clip_ids, output_hidden_states=True).hidden_states[1]
        out2 = te2(input_ids=open_clip.tokenize(PROMPTS), output_hidden_states=True)
        context_1 = conditioner.embedders[0](PROMPTS)
        context_2, pooled = conditioner.embedders[1](PROMPTS)
        batch = shapes_batch(2)
        z, cond = engine.get_input(batch)
        t = torch.tensor([20, 800])
        ours = engine.model.diffusion_model(z, t, context=cond["c_crossattn"][0], y=cond["c_adm"])
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
        theirs = unet(
            z,
            t,
            encoder_hidden_states=cond["c_crossattn"][0],
            added_cond_kwargs={"text_embeds": cond["c_adm"][:, :48], "time_ids": time_ids},
        ).sample
        engine.lora.detach_hooks()
        base = engine.model.diffusion_model(z, t, context=cond["c_crossattn"][0], y=cond["c_adm"])
    torch.testing.assert_close(context_1, expected_1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(context_2, out2.hidden_states[-2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, out2.text_embeds, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_sdxl_lora_trains_every_part_through_main_and_merges_back(tmp_path):
    base = tiny_engine(use_ema=False)
    with torch.no_grad():  # a pretrained base: a fresh UNet's zero output conv passes no gradient
        for p in base.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(base.state_dict(), tmp_path / "base.safetensors")
    lora = [
        f"model.params.ckpt_path={tmp_path / 'base.safetensors'}",
        "model.params.lora_config.unet.rank=4",
        "model.params.lora_config.text_encoder.rank=2",
        "model.params.lora_config.text_encoder.learning_rate=1.0e-3",
    ]
    trainer = run(tmp_path / "logs", "-t", "--max_steps", "2", "--no-test", *lora,
                  "lightning.trainer.limit_val_batches=1")  # fmt: skip
    model = trainer.lightning_module
    ups = {}
    for name, module in model.lora.items():  # the largest |lora_up| of each part (zeros at start)
        part = name.split("_")[1]
        ups[part] = max(ups.get(part, 0.0), module.lora_up.weight.abs().max().item())
    assert set(ups) == {"unet", "te1", "te2"} and all(v > 0 for v in ups.values())
    (logdir,) = sorted((tmp_path / "logs").iterdir())
    out = tmp_path / "adapter.safetensors"
    convert.main(["--ckpt", str(logdir), "--out", str(out), "--adapter"])
    adapter = read_state_dict(out)
    assert {k.split("_")[1] for k in adapter} == {"unet", "te1", "te2"}
    fresh = tiny_engine(use_ema=False, ckpt_path=str(tmp_path / "base.safetensors"))
    merged = adapters.load_lora_file(fresh, out)
    assert merged == len(model.lora)
    expected = adapters.merged_state_dict(model)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key, atol=1e-6, rtol=1e-5)
