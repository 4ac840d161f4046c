"""diffusers folders (unet/, vae/, text_encoder/) load wherever an original SD file loads.

The reference networks are diffusers' and transformers' own, built with random weights from
the tiny config and saved with `save_pretrained`; after loading, ours must compute what they
compute (fp32, 1e-5).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import diffusers_original_config, load_config
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import main
from ldm import inference
from ldm.checkpoint import CheckpointError, is_diffusers_folder, load_weights, read_state_dict
from ldm.diffusers_layout import (
    original_state_dict,
    read_weights,
    unet_module_names,
    vae_module_names,
)
from ldm.modules.encoders.modules import (
    CLIP_CONFIGS,
    CLIP_SHARED,
    OPENCLIP_CONFIGS,
    FrozenOpenCLIPEmbedder,
)
from ldm.util import instantiate_from_config
from scripts import convert

TINY = "tiny/txt2img.yaml"
TINY_OPENCLIP = "ldm/openclip-tiny"
ATOL = 1e-5
PROMPTS = ["a red circle", "an astronaut riding a horse, highly detailed", ""]


def live(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with noise added to every weight, so zero-initialised layers count too."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def diffusers_configs(model_config) -> tuple[dict, dict]:
    """(UNet2DConditionModel, AutoencoderKL) configs of `model_config`, by diffusers' own
    single-file converters."""
    with torch.device("meta"):
        checkpoint = instantiate_from_config(model_config).state_dict()
    original = diffusers_original_config(model_config)
    unet = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint)
    return unet, sfu.create_vae_diffusers_config_from_ldm(original, checkpoint)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """(diffusers folder of the tiny model, its networks): random diffusers UNet and VAE and a
    transformers CLIPTextModel, saved as a pipeline saves them."""
    torch.manual_seed(0)
    unet_config, vae_config = diffusers_configs(load_config(TINY).model)
    networks = {
        "unet": live(UNet2DConditionModel(**unet_config)),
        "vae": live(DiffusersAutoencoderKL(**vae_config)),
        "text_encoder": live(
            CLIPTextModel(CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS["ldm/clip-tiny"]))
        ),
    }
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    for name, network in networks.items():
        network.save_pretrained(folder / name)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, networks


def tiny_config(ckpt_path=None):
    config = load_config(TINY)
    config.model.params.ckpt_path = None if ckpt_path is None else str(ckpt_path)
    return config


def assert_matches(model, networks) -> None:
    """The UNet, autoencoder and text encoder of `model` compute what diffusers' do."""
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 917]), torch.randn(2, 77, 32)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.cond_stage_model.tokenize(["a red circle", ""])
    with torch.no_grad():
        unet = model.model.diffusion_model(x, t, context=context)
        expected = networks["unet"](x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(unet, expected, atol=ATOL, rtol=ATOL)
        mean = model.first_stage_model.encode(images).mean
        expected = networks["vae"].encode(images).latent_dist.mean
        torch.testing.assert_close(mean, expected, atol=ATOL, rtol=ATOL)
        decoded = model.first_stage_model.decode(x)
        torch.testing.assert_close(decoded, networks["vae"].decode(x).sample, atol=ATOL, rtol=ATOL)
        hidden = model.cond_stage_model(["a red circle", ""])
        expected = networks["text_encoder"](input_ids=tokens).last_hidden_state
        torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def loaded(references):
    """The tiny model with `ckpt_path` set to the diffusers folder."""
    return instantiate_from_config(tiny_config(references[0]).model)


def assert_same_weights(model, expected) -> None:
    """`model` holds the weights of `expected` (the schedule and the EMA aside)."""
    weights = {k: v for k, v in expected.state_dict().items() if "." in k and "model_ema" not in k}
    state_dict = model.state_dict()
    assert weights.keys() <= state_dict.keys()
    for key, value in weights.items():
        assert torch.equal(state_dict[key], value), key


def test_ckpt_path_loads_a_diffusers_folder(references, loaded):
    folder, networks = references
    assert is_diffusers_folder(folder) and is_diffusers_folder(folder / "unet")
    assert not is_diffusers_folder(folder / "unet" / "config.json")
    assert_matches(loaded, networks)


def test_load_model_finetune_from_and_convert_read_it(references, loaded, tmp_path):
    folder, _ = references
    config_path = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config(), config_path)
    model, _ = inference.load_model(folder, config_path)
    assert_same_weights(model, loaded)
    finetuned = instantiate_from_config(tiny_config().model)
    main.finetune_from(finetuned, str(folder))
    assert_same_weights(finetuned, loaded)
    out = tmp_path / "tiny.safetensors"
    convert.main(["--ckpt", str(folder), "--config", str(config_path), "--out", str(out)])
    exported = load_file(out)
    assert exported.keys() == model.state_dict().keys()  # the schedule buffers included
    assert_same_weights(instantiate_from_config(tiny_config(out).model), loaded)


def test_convert_needs_a_config_for_a_folder(references, tmp_path):
    folder, _ = references
    with pytest.raises(SystemExit, match="diffusers folder.*--config"):
        convert.main(["--ckpt", str(folder), "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(CheckpointError, match="is a diffusers folder"):
        read_state_dict(folder)


def test_unet_folder_alone_and_load_only_unet(references, loaded):
    folder, _ = references
    for path in (folder, folder / "unet"):
        model = instantiate_from_config(tiny_config().model)
        model.init_from_ckpt(path, only_model=True)
        assert_same_weights(model.model, loaded.model)
    with pytest.raises(CheckpointError, match="missing.*first_stage_model"):
        instantiate_from_config(tiny_config(folder / "unet").model)


def test_old_file_layouts_load(references, loaded, tmp_path):
    """diffusers < 0.14 named the VAE's attention query/key/value/proj_attn, transformers < 5
    kept CLIP under `text_model.`, and older folders hold .bin files."""
    folder, networks = references
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    vae = {}
    for key, value in networks["vae"].state_dict().items():
        for new, old_name in renames.items():
            key = key.replace(new, old_name) if "attentions" in key else key
        vae[key] = value
    (old / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(vae, old / "vae" / "diffusion_pytorch_model.bin")
    text = {f"text_model.{k}": v for k, v in networks["text_encoder"].state_dict().items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(text, old / "text_encoder" / "model.safetensors")
    assert_same_weights(instantiate_from_config(tiny_config(old).model), loaded)


def test_a_folder_without_a_subfolder_says_what_is_missing(references, tmp_path):
    folder, _ = references
    shutil.copytree(folder, tmp_path / "partial", ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(CheckpointError, match=r"partial lacks vae/.*unet/, vae/ and text_encoder/"):
        instantiate_from_config(tiny_config(tmp_path / "partial").model)


def test_weights_that_do_not_fit_name_the_folder_and_keys(references, tmp_path):
    folder, _ = references
    unet_config, _ = diffusers_configs(load_config(TINY).model)
    bigger = tmp_path / "bigger"
    shutil.copytree(folder, bigger)
    UNet2DConditionModel(**{**unet_config, "layers_per_block": 2}).save_pretrained(bigger / "unet")
    with pytest.raises(
        CheckpointError, match=r"bigger/unet does not fit.*no place for: .*attentions\.1"
    ):
        instantiate_from_config(tiny_config(bigger).model)
    wider = {**unet_config, "block_out_channels": [32, 96], "cross_attention_dim": 32}
    UNet2DConditionModel(**wider).save_pretrained(bigger / "unet")
    with pytest.raises(CheckpointError, match=r"bigger/unet does not fit.*wrong shape"):
        instantiate_from_config(tiny_config(bigger).model)


def test_module_names_pair_modules_as_diffusers_converters_do():
    """Every weight of ours, given a unique value, lands under our diffusers name in diffusers'
    own single-file conversion of it."""
    model_config = load_config(TINY).model
    model = instantiate_from_config(model_config)
    checkpoint = {k: torch.full_like(v, i) for i, (k, v) in enumerate(model.state_dict().items())}
    unet_config, vae_config = diffusers_configs(model_config)
    converted = {
        "model.diffusion_model.": (
            unet_module_names(model.model.diffusion_model),
            sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config),
        ),
        "first_stage_model.": (
            vae_module_names(model.first_stage_model),
            sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config),
        ),
    }
    for prefix, (names, theirs) in converted.items():
        for key in (k for k in checkpoint if k.startswith(prefix) and ".loss." not in k):
            path, _, param = key[len(prefix) :].rpartition(".")
            assert theirs[f"{names[path]}.{param}"].flatten()[0] == checkpoint[key].flatten()[0]


def test_unet_module_names_of_sd_v1():
    with torch.device("meta"):
        unet = instantiate_from_config(
            load_config("stable-diffusion/v1-inference.yaml").model.params.unet_config
        )
    names = unet_module_names(unet)
    assert names["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert names["input_blocks.1.0.in_layers.2"] == "down_blocks.0.resnets.0.conv1"
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["middle_block.1.proj_in"] == "mid_block.attentions.0.proj_in"
    assert names["middle_block.2.emb_layers.1"] == "mid_block.resnets.1.time_emb_proj"
    assert names["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert names["output_blocks.3.0.skip_connection"] == "up_blocks.1.resnets.0.conv_shortcut"
    assert names["time_embed.0"] == "time_embedding.linear_1"
    assert names["input_blocks.0.0"] == "conv_in"
    assert names["out.2"] == "conv_out"
    assert len(names) == len(set(names.values())) == 391


def test_original_state_dict_reads_shapes_only(references):
    """A model on the meta device is enough to convert a folder (what convert.py checks with)."""
    folder, networks = references
    with torch.device("meta"):
        skeleton = instantiate_from_config(tiny_config().model)
    state_dict = original_state_dict(folder, skeleton)
    expected = networks["unet"].conv_in.weight
    assert torch.equal(state_dict["model.diffusion_model.input_blocks.0.0.weight"], expected)
    assert {k.split(".")[0] for k in state_dict} == {
        "model",
        "first_stage_model",
        "cond_stage_model",
    }


# ---------------------------------------------------------------- SD 2.x text encoder


def sd2_embedder(layer: str = "penultimate") -> FrozenOpenCLIPEmbedder:
    """SD 2.x's text encoder (v2-inference.yaml's layer: penultimate) on the tiny open_clip
    text tower."""
    return FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer=layer)


def diffusers_sd2_text_encoder(embedder: FrozenOpenCLIPEmbedder) -> CLIPTextModel:
    """The CLIPTextModel a diffusers SD 2.x folder ships for `embedder`: gelu, one layer
    fewer, no text_projection; its weights converted by diffusers' own single-file code."""
    text_cfg = OPENCLIP_CONFIGS[TINY_OPENCLIP]["text_cfg"]
    width, layers = text_cfg["width"], text_cfg["layers"]
    config = CLIPTextConfig(
        vocab_size=text_cfg["vocab_size"],
        max_position_embeddings=text_cfg["context_length"],
        hidden_size=width,
        intermediate_size=4 * width,  # open_clip's mlp_ratio
        num_hidden_layers=layers - 1,
        num_attention_heads=text_cfg["heads"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel(config).eval()
    checkpoint = {f"cond_stage_model.{k}": v for k, v in embedder.state_dict().items()}
    converted = sfu.convert_open_clip_checkpoint(model, checkpoint)
    # diffusers drops ViT-H's last layer by its number (resblocks.23): drop the tiny one's.
    dropped = (f"text_model.encoder.layers.{layers - 1}.", "text_projection.")
    converted = {
        k.removeprefix("text_model."): v for k, v in converted.items() if not k.startswith(dropped)
    }
    model.load_state_dict(converted, strict=True)
    return model


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """(a diffusers folder holding an SD 2.x text_encoder/ alone, its CLIPTextModel)."""
    torch.manual_seed(0)
    reference = diffusers_sd2_text_encoder(live(sd2_embedder()))
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sd2"
    reference.save_pretrained(folder / "text_encoder")
    return folder, reference


def test_sd2_text_encoder_folder_loads_into_the_open_clip_embedder(sd2_folder, caplog):
    folder, reference = sd2_folder
    embedder = sd2_embedder()
    built = {k: v.clone() for k, v in embedder.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="ldm.diffusers_text"):
        state_dict = read_weights(folder, embedder)
    logged = "14 weights the folder lacks (logit_scale, text_projection, transformer.resblocks.1.*)"
    assert logged in caplog.text
    load_weights(embedder, state_dict)  # strict: every key, every shape
    for key in ("model.text_projection", "model.transformer.resblocks.1.attn.in_proj_weight"):
        assert torch.equal(embedder.state_dict()[key], built[key]), key  # as built
    tokens = embedder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state  # after final_layer_norm
        torch.testing.assert_close(embedder(PROMPTS), expected, atol=ATOL, rtol=ATOL)
    with pytest.raises(CheckpointError, match=r"lacks the last .*resblocks\.1.*layer 'last'"):
        original_state_dict(folder / "text_encoder", sd2_embedder(layer="last"))


def test_sd2_text_encoder_old_layout_and_strict_checks(sd2_folder, tmp_path):
    folder, reference = sd2_folder
    shutil.copytree(folder, tmp_path / "odd")
    config_path = tmp_path / "odd" / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_act": "quick_gelu"}))
    with pytest.raises(CheckpointError, match=r"hidden_act 'quick_gelu' vs 'gelu'"):
        original_state_dict(tmp_path / "odd", sd2_embedder())
    config_path.write_text(json.dumps(config))
    old = {f"text_model.{k}": v for k, v in reference.state_dict().items()}  # transformers < 5
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(old, tmp_path / "odd" / "text_encoder" / "model.safetensors")
    converted = original_state_dict(tmp_path / "odd", sd2_embedder())
    assert converted.keys() == original_state_dict(folder, sd2_embedder()).keys()
    weights = {k: v for k, v in reference.state_dict().items() if ".layers.0.mlp." not in k}
    save_file(weights, tmp_path / "odd" / "text_encoder" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"folder lacks: .*resblocks\.0\.mlp\.c_fc"):
        original_state_dict(tmp_path / "odd", sd2_embedder())


def test_sd2_style_model_loads_a_diffusers_folder(references, loaded, sd2_folder, tmp_path):
    """A LatentDiffusion with SD 2.x's text encoder takes the folder through ckpt_path."""
    shutil.copytree(references[0], tmp_path / "sd2", ignore=shutil.ignore_patterns("text_*"))
    shutil.copytree(sd2_folder[0] / "text_encoder", tmp_path / "sd2" / "text_encoder")
    config = tiny_config(tmp_path / "sd2")
    config.model.params.cond_stage_config = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": TINY_OPENCLIP, "layer": "penultimate"},
    }
    model = instantiate_from_config(config.model)
    tokens = model.cond_stage_model.tokenize(PROMPTS)
    with torch.no_grad():
        expected = sd2_folder[1](input_ids=tokens).last_hidden_state
        hidden = model.get_learned_conditioning(PROMPTS)
    torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=ATOL)
    assert_same_weights(model.model, loaded.model)
