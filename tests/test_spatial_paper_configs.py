"""The paper's spatially conditioned configs (LDM-SR x4, inpainting big, semantic synthesis) build their models
with the published sizes: UNet parameter counts from ``jax.eval_shape`` (nothing allocated) against the CompVis
models instantiated in PyTorch (reference §1.3), and ``in_channels`` = latent + concatenated channels."""

import functools

import jax
import numpy as np
import pytest

from configs import inpainting_f4, semantic_f4, sr4x_f4
from lidiff.ldm import FirstStage
from lidiff.train import builders
from lidiff.train.common import SOURCE_KINDS
from lidiff.train.diffusion import DiffusionTrainer

# name -> (module, UNet params in M at the reference's precision, digits, concat channels, conditioning params)
CASES = {"sr4x_f4": (sr4x_f4, 113.6, 1, 3, 0), "inpainting_f4": (inpainting_f4, 387.25, 2, 4, 0),
         "semantic_f4": (semantic_f4, 215.2, 1, 3, 182 * 3)}


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(CASES))
def test_spatial_paper_config_sizes(name):
    module, unet_m, digits, concat, cond_params = CASES[name]
    config = module.get_config()
    d = config.diffusion
    assert config.data.source in SOURCE_KINDS and config.data.resolution == 256
    assert d.conditioning.mode == "concat" and d.model.context_dim == 0
    assert d.model.in_channels == config.autoencoder.model.embed_dim + concat
    first = FirstStage(model=builders.build_autoencoder(config.autoencoder.model), kind=config.autoencoder.model.kind)
    trainer = DiffusionTrainer(d, first, seed=0)
    assert trainer.ldm.conditioner.concat_channels == concat
    latent_shape = trainer.latent_shape(config.data.resolution)
    assert latent_shape == (64, 64, 3)
    shapes = jax.eval_shape(functools.partial(trainer.ldm.init_params, latent_shape=latent_shape),
                            jax.random.PRNGKey(0))
    assert round(count(shapes["unet"]) / 1e6, digits) == unet_m, count(shapes["unet"])
    assert count(shapes["cond"]) == cond_params


def test_spatial_paper_config_values():
    sr = sr4x_f4.get_config().diffusion
    assert (sr.model.model_channels, tuple(sr.model.channel_mult), tuple(sr.model.attention_resolutions)) == (
        160, (1, 2, 2, 4), (16, 8))
    assert (sr.process.linear_start, sr.process.linear_end, sr.conditioning.sr_factor) == (0.0015, 0.0155, 4)
    assert sr.conditioning.degradation == "bicubic"
    assert sr4x_f4.get_config("bsr").diffusion.conditioning.degradation == "bsr_light"
    inpaint = inpainting_f4.get_config()
    assert inpaint.autoencoder.model.attn_type == "none"  # vq-f4-noattn
    assert inpaint.diffusion.model.resblock_updown and inpaint.diffusion.process.loss_type == "l1"
    assert (inpaint.diffusion.process.linear_start, inpaint.diffusion.process.linear_end) == (0.0015, 0.0205)
    semantic = semantic_f4.get_config().diffusion
    assert (semantic.conditioning.num_classes, semantic.conditioning.map_channels) == (182, 3)
    assert semantic.process.loss_type == "l1"
    for module in (sr4x_f4, inpainting_f4, semantic_f4):
        with pytest.raises(ValueError, match="unknown variant"):
            module.get_config("imagenett")
