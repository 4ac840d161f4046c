"""SDXL's conditioning: the OpenCLIP ViT-bigG-shaped embedder against open_clip itself, CLIP's
pooled output, and GeneralConditioner (the released config's embedders, guidance dropout,
zeroed unconditional text, trainable embedders) against diffusers' text_time UNet."""

from __future__ import annotations

import open_clip
import pytest
import torch
from test_encoders import TINY_CLIP, tiny_text_model
from test_sdxl_unet import TIME_DIM, TINY_BASE, tiny_pair

from ldm.modules.conditioner import GeneralConditioner
from ldm.modules.encoders.modules import (
    OPENCLIP_CONFIGS,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder2,
)
from ldm.util import instantiate_from_config

TINY_BIGG = "ldm/openclip-bigg-tiny"
ENCODERS = "ldm.modules.encoders.modules."
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
PROMPTS = ["a red cube on a blue floor", "two green circles"]


def text_embedders(clip: dict | None = None, bigg: dict | None = None) -> list[dict]:
    """The two text embedders of sd_xl_base.yaml, tiny; `clip` / `bigg` update their entries."""
    return [
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": ENCODERS + "FrozenCLIPEmbedder",
            "params": {"version": TINY_CLIP, "layer": "hidden", "layer_idx": 1},
        }
        | (clip or {}),
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": ENCODERS + "FrozenOpenCLIPEmbedder2",
            "params": {
                "arch": TINY_BIGG,
                "version": "laion2b_s39b_b160k",
                "freeze": True,
                "layer": "penultimate",
                "always_return_pooled": True,
                "legacy": False,
            },
        }
        | (bigg or {}),
    ]


def size_embedders(outdim: int = TIME_DIM) -> list[dict]:
    return [
        {
            "is_trainable": False,
            "input_key": key,
            "target": ENCODERS + "ConcatTimestepEmbedderND",
            "params": {"outdim": outdim},
        }
        for key in SIZE_KEYS
    ]


def sdxl_batch(prompts: list[str] = PROMPTS) -> dict:
    n = len(prompts)
    return {
        "txt": prompts,
        "original_size_as_tuple": torch.tensor([[1024.0, 768.0], [512.0, 640.0]])[:n],
        "crop_coords_top_left": torch.tensor([[0.0, 64.0], [16.0, 0.0]])[:n],
        "target_size_as_tuple": torch.tensor([[1024.0, 1024.0], [768.0, 1344.0]])[:n],
    }


def tiny_conditioner(embedders: list[dict] | None = None) -> GeneralConditioner:
    emb_models = text_embedders() + size_embedders() if embedders is None else embedders
    config = {"target": "ldm.modules.GeneralConditioner", "params": {"emb_models": emb_models}}
    return instantiate_from_config(config)


def tiny_bigg_clip() -> open_clip.model.CLIP:
    """open_clip's own CLIP of the tiny bigG text config, with a minimal vision tower."""
    config = OPENCLIP_CONFIGS[TINY_BIGG]
    vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=8)
    return open_clip.model.CLIP(config["embed_dim"], vision_cfg, config["text_cfg"]).eval()


def test_bigg_shaped_embedder_matches_open_clip():
    reference = tiny_bigg_clip()
    sdxl = FrozenOpenCLIPEmbedder2(
        arch=TINY_BIGG, layer="penultimate", always_return_pooled=True, legacy=False
    )
    result = sdxl.model.load_state_dict(reference.state_dict(), strict=False)
    assert all(k.startswith("visual.") for k in result.unexpected_keys)
    assert not result.missing_keys
    legacy = FrozenOpenCLIPEmbedder2(arch=TINY_BIGG, layer="penultimate")
    legacy.load_state_dict(sdxl.state_dict())
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        raw = reference.forward_intermediates(text=tokens, text_indices=2, normalize=False)
        normed = reference.forward_intermediates(
            text=tokens, text_indices=2, normalize_intermediates=True, normalize=False
        )
        context, pooled = sdxl(PROMPTS)
        expected_pooled = reference.encode_text(tokens)
        legacy_context = legacy(PROMPTS)
    # SDXL's context is the penultimate block's output as is; SD 2.x's rule norms it.
    torch.testing.assert_close(context, raw["text_intermediates"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(legacy_context, normed["text_intermediates"][0])
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-4, rtol=1e-4)
    assert context.shape == (2, 77, 48) and pooled.shape == (2, 48)


def test_clip_always_return_pooled_gives_transformers_pooler_output():
    reference = tiny_text_model()
    encoder = FrozenCLIPEmbedder(version=TINY_CLIP, layer="hidden", layer_idx=1)
    encoder.transformer.text_model.load_state_dict(reference.state_dict())
    pooled_too = FrozenCLIPEmbedder(
        version=TINY_CLIP, layer="hidden", layer_idx=1, always_return_pooled=True
    )
    pooled_too.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        out = reference(input_ids=encoder.tokenize(PROMPTS), output_hidden_states=True)
        context, pooled = pooled_too(PROMPTS)
    assert torch.equal(context, encoder(PROMPTS))
    torch.testing.assert_close(context, out.hidden_states[1])
    torch.testing.assert_close(pooled, out.pooler_output)


def test_pooled_embedder_refuses_the_legacy_rule():
    with pytest.raises(ValueError, match="always_return_pooled needs legacy: false"):
        FrozenOpenCLIPEmbedder2(arch=TINY_BIGG, always_return_pooled=True)


def test_conditioner_output_drives_the_unet_as_diffusers_added_cond_kwargs():
    conditioner = tiny_conditioner().eval()
    batch = sdxl_batch()
    with torch.no_grad():
        c = conditioner(batch)
        _, pooled = conditioner.embedders[1](PROMPTS)
    assert set(c) == {"crossattn", "vector"}
    assert c["crossattn"].shape == (2, 77, 32 + 48)  # CLIP's hidden layer, then bigG's
    assert c["vector"].shape == (2, 48 + 3 * 2 * TIME_DIM)  # pooled, then the sizes
    torch.testing.assert_close(c["vector"][:, :48], pooled)
    unet, reference = tiny_pair(TINY_BASE | {"context_dim": 80, "adm_in_channels": 72})
    time_ids = torch.cat([batch[k] for k in SIZE_KEYS], dim=1)  # (B, 6)
    # diffusers' time-id path: Fourier features of each id, flattened after the pooled text.
    time_embeds = reference.add_time_proj(time_ids.flatten()).reshape(2, -1)
    torch.testing.assert_close(c["vector"][:, 48:], time_embeds)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([40, 700])
    with torch.no_grad():
        ours = unet(x, t, context=c["crossattn"], y=c["vector"])
        theirs = reference(
            x,
            t,
            encoder_hidden_states=c["crossattn"],
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_released_sdxl_conditioner_config_builds_the_released_widths():
    emb_models = text_embedders(
        clip={"params": {"layer": "hidden", "layer_idx": 11}},
        bigg={
            "params": {
                "arch": "ViT-bigG-14",
                "version": "laion2b_s39b_b160k",
                "freeze": True,
                "layer": "penultimate",
                "always_return_pooled": True,
                "legacy": False,
            }
        },
    ) + size_embedders(outdim=256)
    with torch.device("meta"):
        conditioner = tiny_conditioner(emb_models)
    shapes = {k: tuple(v.shape) for k, v in conditioner.state_dict().items()}
    assert shapes["embedders.0.transformer.text_model.embeddings.token_embedding.weight"] == (
        49408,
        768,
    )
    assert shapes["embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["embedders.1.model.positional_embedding"] == (77, 1280)
    assert shapes["embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias"] == (1280,)
    assert not any(k.startswith(("embedders.2", "embedders.3", "embedders.4")) for k in shapes)
    with torch.device("meta"):
        c = conditioner(sdxl_batch())
    # The UNet's context_dim and adm_in_channels of sd_xl_base.yaml.
    assert c["crossattn"].shape == (2, 77, 2048) and c["vector"].shape == (2, 2816)


def test_guidance_dropout_zeroes_an_embedders_outputs_together_in_training_only():
    embedders = text_embedders(bigg={"ucg_rate": 0.5}) + size_embedders()
    conditioner = tiny_conditioner(embedders)
    prompts = [f"prompt {i}" for i in range(64)]
    batch = {"txt": prompts} | {k: torch.full((64, 2), 512.0) for k in SIZE_KEYS}
    with torch.no_grad():
        kept = conditioner.eval()(batch)
        torch.manual_seed(0)
        dropped = conditioner.train()(batch)
    assert torch.equal(kept["crossattn"][:, :, :32], dropped["crossattn"][:, :, :32])  # CLIP
    zero_context = (dropped["crossattn"][:, :, 32:] == 0).flatten(1).all(dim=1)  # (B,)
    zero_pooled = (dropped["vector"][:, :48] == 0).all(dim=1)
    assert torch.equal(zero_context, zero_pooled)  # one draw per embedder and sample
    assert 16 <= int(zero_context.sum()) <= 48
    torch.testing.assert_close(
        dropped["crossattn"][~zero_context], kept["crossattn"][~zero_context]
    )
    assert torch.equal(dropped["vector"][:, 48:], kept["vector"][:, 48:])  # sizes: no dropout


def test_legacy_ucg_value_replaces_the_caption():
    embedders = text_embedders(clip={"ucg_rate": 1.0, "legacy_ucg_value": ""})
    conditioner = tiny_conditioner(embedders).train()
    with torch.no_grad():
        dropped = conditioner({"txt": PROMPTS})["crossattn"][:, :, :32]
        empty = conditioner.embedders[0](["", ""])
    assert torch.equal(dropped, empty)


def test_unconditional_conditioning_zeroes_the_text_but_not_the_sizes():
    embedders = text_embedders(bigg={"ucg_rate": 1.0}) + size_embedders()
    conditioner = tiny_conditioner(embedders).train()  # no dropout here even in training
    batch = sdxl_batch()
    with torch.no_grad():
        c, uc = conditioner.get_unconditional_conditioning(
            batch, batch_uc=batch | {"txt": ["", ""]}, force_uc_zero_embeddings=["txt"]
        )
        plain = conditioner.eval()(batch)
    torch.testing.assert_close(c["crossattn"], plain["crossattn"])
    assert not c["crossattn"].eq(0).all()
    assert uc["crossattn"].eq(0).all() and uc["vector"][:, :48].eq(0).all()
    torch.testing.assert_close(uc["vector"][:, 48:], c["vector"][:, 48:])


def test_trainable_embedders_get_gradients_and_frozen_ones_stay_frozen():
    embedders = text_embedders(
        clip={"is_trainable": True, "params": {"version": TINY_CLIP, "freeze": False}}
    )
    conditioner = tiny_conditioner(embedders).train()
    assert conditioner.embedders[0].training and not conditioner.embedders[1].training
    assert not any(p.requires_grad for p in conditioner.embedders[1].parameters())
    conditioner({"txt": PROMPTS})["crossattn"].square().mean().backward()
    grads = [p.grad for p in conditioner.embedders[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match=r"emb_models\[0\].*is_trainable.*pass freeze: false"):
        tiny_conditioner(text_embedders(clip={"is_trainable": True}))


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"input_key": None}, r"emb_models\[0\].*needs an input_key"),
        ({"ucg_rate": 1.5}, r"ucg_rate must be a number in \[0, 1\], got 1.5"),
        ({"params": {"bogus": 1}}, r"does not accept params \['bogus'\]"),
    ],
)
def test_bad_embedder_entries_are_named(entry, message):
    clip = text_embedders()[0] | entry
    if entry.get("input_key", "") is None:
        clip.pop("input_key")
    with pytest.raises(ValueError, match=message):
        tiny_conditioner([clip])


def test_missing_batch_entries_and_mismatched_outputs_are_named():
    conditioner = tiny_conditioner().eval()
    with pytest.raises(KeyError, match="batch has no 'crop_coords_top_left' entry"):
        conditioner({k: v for k, v in sdxl_batch().items() if k != "crop_coords_top_left"})
    chunked = text_embedders(clip={"params": {"version": TINY_CLIP, "long_prompts": "chunk"}})
    long_prompt = " ".join(["a castle on a hill"] * 20)
    with pytest.raises(ValueError, match=r"embedder 1 .*cannot join.*\(1, 154, 32\)"):
        tiny_conditioner(chunked).eval()({"txt": [long_prompt]})
