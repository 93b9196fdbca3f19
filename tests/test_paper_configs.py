"""The paper configs (cin256-v2, txt2img-1p4B, layout2img) build their models with the published sizes.

Each config and variant builds a ``DiffusionTrainer`` on its own first stage; parameter counts come from
``jax.eval_shape`` of ``init_params`` (shapes only: nothing is allocated). UNet counts are the CompVis models
instantiated in PyTorch (reference §1.3); the conditioning encoders are counted from their formulas.
"""

import functools
import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import cin256_f4, layout_f4, txt2img_f8
from lidiff.data.text import build_wordpiece_tokenizer
from lidiff.ldm import FirstStage
from lidiff.train import builders
from lidiff.train.common import SOURCE_KINDS
from lidiff.train.diffusion import DiffusionTrainer

MODULES = {"cin256_f4": cin256_f4, "txt2img_f8": txt2img_f8, "layout_f4": layout_f4}
CASES = [(name, variant) for name, module in MODULES.items() for variant in (None, *module.VARIANTS)]
IDS = [f"{name}:{variant or 'default'}" for name, variant in CASES]


def transformer_embedder_params(vocab: int, seq: int, dim: int, depth: int, heads: int = 8, dim_head: int = 64,
                                ff_mult: int = 4) -> int:
    """Params of ``TransformerEmbedder`` (x-transformers encoder, without CompVis's unused ``to_logits``)."""
    inner = heads * dim_head
    attention = 3 * dim * inner + inner * dim + dim  # to_q, to_k, to_v (no bias), to_out (+ bias)
    feed_forward = dim * ff_mult * dim + ff_mult * dim + ff_mult * dim * dim + dim
    layer_norms = 2 * 2 * dim
    return vocab * dim + seq * dim + depth * (attention + feed_forward + layer_norms) + 2 * dim


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny WordPiece tokenizer (stands in for bert-base-uncased; vocab_size 30522 >= its size)."""
    captions = ["a painting of a virus monster playing guitar", "a cat sitting on a wooden bench",
                "a red bus parked on a city street", "a plate of food with broccoli and rice"]
    return build_wordpiece_tokenizer(captions, str(tmp_path_factory.mktemp("tokenizer")), vocab_size=100)


def get(name: str, variant: str | None) -> ConfigDict:
    module = MODULES[name]
    return module.get_config() if variant is None else module.get_config(variant)


def build_trainer(config: ConfigDict, tokenizer) -> DiffusionTrainer:
    first = builders.build_autoencoder(config.autoencoder.model)
    tok = tokenizer if config.diffusion.conditioning.kind == "text" else None
    return DiffusionTrainer(config.diffusion, FirstStage(model=first, kind=config.autoencoder.model.kind),
                            seed=config.seed, tokenizer=tok)


def param_counts(name: str, tokenizer) -> tuple[int, int, tuple[int, int, int]]:
    """(UNet params, conditioning encoder params, latent shape) of a config's default variant, by eval_shape."""
    config = get(name, None)
    trainer = build_trainer(config, tokenizer)
    latent_shape = trainer.latent_shape(config.data.resolution)
    # latent_shape is static (a tuple of Python ints), so it is bound, not traced.
    shapes = jax.eval_shape(functools.partial(trainer.ldm.init_params, latent_shape=latent_shape),
                            jax.random.PRNGKey(0))
    return count(shapes["unet"]), count(shapes["cond"]), latent_shape


@pytest.mark.parametrize("name, variant", CASES, ids=IDS)
def test_config_builds_a_trainer_and_round_trips(name, variant, tokenizer):
    config = get(name, variant)
    d = config.diffusion
    assert d.model.context_dim == d.conditioning.embed_dim
    assert d.model.in_channels == d.model.out_channels == config.autoencoder.model.embed_dim
    assert config.data.resolution == config.autoencoder.model.resolution == 256
    assert config.data.source in SOURCE_KINDS
    assert config.stages == ("diffusion",)
    build_trainer(config, tokenizer)
    # The variants change the data only: the model, schedule and conditioning are the default's.
    if variant is not None:
        default = get(name, None).diffusion
        for section in ("model", "process", "first_stage", "optim"):
            assert d[section].to_dict() == default[section].to_dict(), section
        assert d.conditioning.kind == default.conditioning.kind
    config.lock()
    with pytest.raises(AttributeError):
        config.diffusion.model.contxt_dim = 1  # a typo is refused once locked
    text = config.to_json()
    again = ConfigDict(json.loads(text))
    assert again.to_json() == text
    assert again.diffusion.conditioning.to_dict() == config.diffusion.conditioning.to_dict()


@pytest.mark.parametrize("name", list(MODULES))
def test_unknown_variant_is_refused(name):
    with pytest.raises(ValueError, match="unknown variant"):
        MODULES[name].get_config("imagenett")


def test_cin256_v2(tokenizer):
    config = cin256_f4.get_config()
    d = config.diffusion
    assert config.autoencoder.model.kind == "vq" and config.autoencoder.model.n_embed == 8192
    assert (d.model.model_channels, tuple(d.model.channel_mult), d.model.num_res_blocks) == (192, (1, 2, 3, 5), 2)
    assert tuple(d.model.attention_resolutions) == (8, 4, 2)
    assert (d.model.num_heads, d.model.num_head_channels, d.model.legacy) == (1, -1, True)
    assert d.model.use_spatial_transformer and d.model.transformer_depth == 1 and d.model.context_dim == 512
    assert (d.conditioning.kind, d.conditioning.mode, d.conditioning.num_classes) == ("class", "crossattn", 1000)
    assert d.conditioning.p_uncond == 0.1
    assert (d.process.schedule, d.process.linear_start, d.process.linear_end) == ("scaled_linear", 0.0015, 0.0195)
    assert (d.process.parameterization, d.process.loss_type) == ("eps", "l2")
    assert d.first_stage.scale_factor == 1.0 and not d.first_stage.scale_by_std
    assert (d.optim.learning_rate, d.train.batch_size, d.train.num_steps) == (1e-4, 1200, 178_000)
    assert d.sample.guidance_scale == 1.5
    assert (config.data.source, config.data.tfds_name, config.data.label_key) == ("tfds", "imagenet2012", "label")
    folder = cin256_f4.get_config("folder").data
    assert folder.source == "folder" and folder.class_from_subdir

    unet, cond, latent_shape = param_counts("cin256_f4", tokenizer)
    assert latent_shape == (64, 64, 3)
    assert round(unet / 1e6, 2) == 400.92, unet
    assert cond == 1001 * 512  # ClassEmbedder: 1000 classes + the null class 1000
    trainer = build_trainer(config, tokenizer)
    assert int(trainer.ldm.conditioner.null_inputs(1)["label"][0]) == 1000


def test_txt2img_1p4b(tokenizer):
    config = txt2img_f8.get_config()
    d = config.diffusion
    ae = config.autoencoder.model
    assert (ae.kind, tuple(ae.ch_mult), ae.z_channels, ae.embed_dim) == ("kl", (1, 2, 4, 4), 4, 4)
    assert (d.model.model_channels, tuple(d.model.channel_mult), d.model.num_res_blocks) == (320, (1, 2, 4, 4), 2)
    assert tuple(d.model.attention_resolutions) == (4, 2, 1)
    assert (d.model.num_heads, d.model.num_head_channels, d.model.legacy) == (8, -1, False)
    assert d.model.use_spatial_transformer and d.model.transformer_depth == 1 and d.model.context_dim == 1280
    assert d.model.remat
    c = d.conditioning
    assert (c.kind, c.n_layer, c.embed_dim, c.heads, c.dim_head) == ("text", 32, 1280, 8, 64)
    assert (c.vocab_size, c.max_length, c.tokenizer, c.p_uncond) == (30522, 77, "", 0.1)
    assert (d.process.schedule, d.process.linear_start, d.process.linear_end) == ("scaled_linear", 0.00085, 0.012)
    assert (d.process.parameterization, d.process.loss_type) == ("eps", "l2")
    assert d.first_stage.scale_factor == 0.18215 and not d.first_stage.scale_by_std
    assert (d.optim.learning_rate, d.train.batch_size, d.train.num_steps) == (1e-4, 680, 390_000)
    assert d.sample.guidance_scale == 5.0 and len(d.sample.prompts) >= 1
    assert (config.data.source, config.data.tfds_name, config.data.caption_key) == (
        "tfds_captions", "coco_captions", "captions/text")
    assert txt2img_f8.get_config("folder").data.source == "captioned_folder"
    assert txt2img_f8.get_config("manifest").data.source == "caption_manifest"

    unet, cond, latent_shape = param_counts("txt2img_f8", tokenizer)
    assert latent_shape == (32, 32, 4)
    assert round(unet / 1e6, 2) == 872.30, unet
    expected = transformer_embedder_params(vocab=30522, seq=77, dim=1280, depth=32)
    assert expected == 542_895_360
    assert cond == expected, cond
    # Reference §2.5: "582M params (incl. an unused 39M to_logits)". to_logits is Linear(1280, 30522) with bias.
    to_logits = 1280 * 30522 + 30522
    assert round((expected + to_logits) / 1e6) == 582 and round(to_logits / 1e6) == 39


def test_layout2img_openimages(tokenizer):
    config = layout_f4.get_config()
    d = config.diffusion
    assert config.autoencoder.model.kind == "vq" and config.autoencoder.model.n_embed == 8192
    assert (d.model.model_channels, tuple(d.model.channel_mult), d.model.num_res_blocks) == (128, (1, 2, 3, 4), 2)
    assert tuple(d.model.attention_resolutions) == (8, 4, 2)
    assert (d.model.num_heads, d.model.num_head_channels, d.model.legacy) == (-1, 32, True)
    assert d.model.use_spatial_transformer and d.model.transformer_depth == 3 and d.model.context_dim == 512
    c = d.conditioning
    assert (c.kind, c.num_classes, c.max_boxes, c.vocab_size) == ("layout", 80, 30, 8192)
    assert (c.embed_dim, c.n_layer, c.heads, c.dim_head) == (512, 16, 8, 64)
    assert (d.process.schedule, d.process.linear_start, d.process.linear_end) == ("scaled_linear", 0.0015, 0.0205)
    assert (d.process.parameterization, d.process.loss_type) == ("eps", "l1")
    assert d.first_stage.scale_factor == 1.0 and not d.first_stage.scale_by_std
    assert (d.optim.learning_rate, d.train.batch_size) == (4.8e-5, 24)
    assert config.data.source == "coco_layout"
    openimages = layout_f4.get_config("openimages").diffusion
    assert openimages.conditioning.num_classes == 601 and openimages.train.num_steps == 4_400_000

    unet, cond, latent_shape = param_counts("layout_f4", tokenizer)
    assert latent_shape == (64, 64, 3)
    assert round(unet / 1e6, 1) == 246.3, unet  # the reference gives 246.3M (one decimal only)
    assert round(unet / 1e6, 2) == 246.28, unet  # lidiff's count at 0.01M (246,277,379), pinned against drift
    # 30 boxes x 3 tokens = 90 positions (CompVis: 92, with 2 crop tokens lidiff does not use).
    expected = transformer_embedder_params(vocab=8192, seq=90, dim=512, depth=16)
    assert expected == 54_654_976
    assert cond == expected, cond
    # The openimages variant differs only in box classes, which share the 8192-token vocabulary: same sizes.
    trainer = build_trainer(layout_f4.get_config("openimages"), tokenizer)
    shapes = jax.eval_shape(trainer.ldm.conditioner.init, jax.random.PRNGKey(0))
    assert count(shapes) == expected


def test_schedules_match_the_configs(tokenizer):
    for name, start, end in (("cin256_f4", 0.0015, 0.0195), ("txt2img_f8", 0.00085, 0.012),
                             ("layout_f4", 0.0015, 0.0205)):
        trainer = build_trainer(get(name, None), tokenizer)
        betas = np.asarray(trainer.ldm.schedule.betas, np.float64)
        assert betas.shape == (1000,)
        np.testing.assert_allclose([betas[0], betas[-1]], [start, end], rtol=1e-5)
        # CompVis "linear": linear in sqrt(beta).
        np.testing.assert_allclose(np.diff(np.sqrt(betas)), (np.sqrt(end) - np.sqrt(start)) / 999, rtol=1e-3)


def test_txt2img_clip_f8_is_stable_diffusion_v1():
    """SD v1's UNet (859,520,964 params as diffusers counts it) over 64x64x4 latents, conditioned by a frozen
    CLIP ViT-L/14 text tower (123,060,480 params) that the trained params never hold."""
    from configs import txt2img_clip_f8
    from lidiff.convert.clip import abstract_params
    from lidiff.models.clip import CLIPTextTransformer
    from tests.clip_support import tiny_clip_tokenizer

    config = txt2img_clip_f8.get_config()
    d = config.diffusion
    assert (d.conditioning.kind, d.conditioning.encoder, d.conditioning.clip_output) == ("text", "clip", "last")
    assert d.model.context_dim == d.conditioning.embed_dim == 768 and d.conditioning.max_length == 77
    assert (d.process.linear_start, d.process.linear_end, d.first_stage.scale_factor) == (0.00085, 0.012, 0.18215)
    assert d.optim.warmup_steps == 10_000 and d.conditioning.p_uncond == 0.1
    assert txt2img_clip_f8.get_config("manifest").data.source == "caption_manifest"
    vit_l = CLIPTextTransformer(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12,
                                num_heads=12)
    first = builders.build_autoencoder(config.autoencoder.model)
    trainer = DiffusionTrainer(d, FirstStage(model=first, kind="kl"), seed=0, tokenizer=tiny_clip_tokenizer(),
                               text_encoder=(vit_l, None))
    latent_shape = trainer.latent_shape(config.data.resolution)
    assert latent_shape == (64, 64, 4)
    shapes = jax.eval_shape(functools.partial(trainer.ldm.init_params, latent_shape=latent_shape),
                            jax.random.PRNGKey(0))
    assert (count(shapes["unet"]), count(shapes["cond"])) == (859_520_964, 0)
    assert count(abstract_params(vit_l)) == 123_060_480
