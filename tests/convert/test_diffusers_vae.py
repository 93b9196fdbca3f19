"""Autoencoder weights from diffusers / CompVis state dicts: forward parity with diffusers and strict refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import VQModel as TorchVQ

from lidiff.convert.common import ConversionError
from lidiff.convert.diffusers_vae import (
    autoencoder_params_from_compvis,
    autoencoder_params_from_diffusers,
    diffusers_vae_to_compvis,
)
from lidiff.models.autoencoder import AutoencoderKL
from lidiff.models.quantizer import VQModel

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: weights N(0, 1/fan_in), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2),
    codebook N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("embedding.weight"):
                p.copy_(noise)
            elif p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


KL_CASES = {
    # attention inside level 1 (16x16 for a 32x32 input) of encoder and decoder, 2 blocks per level
    "attn-levels": dict(
        torch=dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=2),
        lidiff=dict(num_res_blocks=2, attn_resolutions=(16,)),
    ),
    # no attention anywhere (CompVis attn_type="none" == diffusers mid_block_add_attention=False)
    "no-attn": dict(
        torch=dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   layers_per_block=1, mid_block_add_attention=False),
        lidiff=dict(num_res_blocks=1, attn_type="none"),
    ),
}


@pytest.mark.parametrize("case", sorted(KL_CASES))
def test_autoencoder_kl_parity_with_diffusers(case):
    cfg = KL_CASES[case]
    ref = randomize(TorchKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, **cfg["torch"]), 0)
    model = AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 2), resolution=32, z_channels=4, **cfg["lidiff"])
    params = autoencoder_params_from_diffusers(ref.state_dict(), model)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rng.randn(2, 16, 16, 4).astype(np.float32)
    with torch.no_grad():
        post_ref = ref.encode(nchw(x)).latent_dist
        dec_ref = ref.decode(nchw(z)).sample
        rec_ref = ref(nchw(x), sample_posterior=False).sample
    post = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
    dec = model.apply({"params": params}, jnp.asarray(z), method=model.decode)
    rec, _ = model.apply({"params": params}, jnp.asarray(x), sample_posterior=False)
    errs = {
        "mean": rel_err(post.mean, nhwc(post_ref.mean)),
        "logvar": rel_err(post.logvar, nhwc(post_ref.logvar)),
        "decode": rel_err(dec, nhwc(dec_ref)),
        "reconstruct": rel_err(rec, nhwc(rec_ref)),
    }
    assert all(e < TOL for e in errs.values()), errs
    assert float(np.std(nhwc(dec_ref))) > 0.05  # the comparison is not between near-constant outputs


def test_vq_model_parity_with_diffusers():
    ref = randomize(TorchVQ(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                            num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32, norm_type="group"), 1)
    model = VQModel(n_embed=64, embed_dim=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4)
    params = autoencoder_params_from_diffusers(ref.state_dict(), model)
    x = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        h_ref = ref.encode(nchw(x)).latents
        zq_ref, loss_ref, (_, _, idx_ref) = ref.quantize(h_ref)
        dec_ref, commit_ref = ref.decode(h_ref, return_dict=False)
        unq_ref = ref.decode(h_ref, force_not_quantize=True).sample
    h = model.apply({"params": params}, jnp.asarray(x), method=model.encode)
    z_q, q = model.apply({"params": params}, h, method=model.quantize_latent)
    dec = model.apply({"params": params}, h, method=model.decode)
    unq = model.apply({"params": params}, jnp.asarray(nhwc(h_ref)), method=model.decode_quantized)
    idx_ref = idx_ref.numpy().reshape(2, 16, 16)
    assert len(np.unique(idx_ref)) > 8  # many codes in play, so the index comparison means something
    np.testing.assert_array_equal(np.asarray(q.indices), idx_ref)
    errs = {
        "encode": rel_err(h, nhwc(h_ref)),
        "z_q": rel_err(z_q, nhwc(zq_ref)),
        "decode (quantised)": rel_err(dec, nhwc(dec_ref)),
        "decode_quantized (no lookup)": rel_err(unq, nhwc(unq_ref)),
        "loss": rel_err(q.loss, float(loss_ref)),
    }
    assert all(e < TOL for e in errs.values()), errs


@pytest.fixture(scope="module")
def small_kl():
    ref = randomize(TorchKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4), 2)
    model = AutoencoderKL(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4)
    return ref.state_dict(), model


def test_diffusers_keys_become_compvis_keys(small_kl):
    sd, _ = small_kl
    cv = diffusers_vae_to_compvis(sd)
    assert len(cv) == len(sd)
    shapes = {k: tuple(v.shape) for k, v in cv.items()}
    assert shapes["encoder.down.0.downsample.conv.weight"] == (32, 32, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (64, 32, 1, 1)
    assert shapes["encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)  # Linear -> Conv2d 1x1 as in CompVis
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (64, 64, 1, 1)
    assert shapes["encoder.mid.attn_1.norm.bias"] == (64,)
    assert shapes["encoder.mid.block_2.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["encoder.norm_out.weight"] == (64,)
    # decoder levels reversed: diffusers up_blocks.0 runs first = CompVis up.1 (low resolution, 64 channels)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (64, 64, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)
    assert shapes["decoder.up.0.block.1.conv1.weight"] == (32, 32, 3, 3)
    assert not any(k.startswith("decoder.up.0.upsample") for k in cv)
    torch.testing.assert_close(cv["decoder.up.1.upsample.conv.weight"],
                               sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert all(k in cv for k in ("quant_conv.weight", "post_quant_conv.bias", "decoder.conv_out.weight"))


def test_compvis_checkpoint_round_trip_drops_loss_keys(small_kl):
    sd, model = small_kl
    want = autoencoder_params_from_diffusers(sd, model)
    cv = diffusers_vae_to_compvis(sd)
    cv["loss.logvar"] = torch.zeros(())
    cv["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    got = autoencoder_params_from_compvis(cv, model)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert got["decoder"]["up_0"]["block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 64, 32)
    # a full LDM checkpoint: take the first stage by prefix, ignore the rest
    ldm = {f"first_stage_model.{k}": v for k, v in cv.items()}
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    ldm["scale_factor"] = torch.tensor(0.18215)
    got = autoencoder_params_from_compvis(ldm, model, prefix="first_stage_model.")
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ConversionError, match="cond_stage_model"):
        autoencoder_params_from_compvis(cv, model, prefix="cond_stage_model.")


def test_missing_extra_and_misshaped_keys_are_named(small_kl):
    sd, model = small_kl
    cv = diffusers_vae_to_compvis(sd)
    missing = {k: v for k, v in cv.items() if k != "encoder.mid.attn_1.k.weight"}
    with pytest.raises(ConversionError, match="encoder/mid/attn_1/k/kernel"):
        autoencoder_params_from_compvis(missing, model)
    extra = dict(cv, **{"encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ConversionError, match=r"unexpected.*encoder\.down\.0\.attn\.0\.q\.weight"):
        autoencoder_params_from_compvis(extra, model)
    wrong = dict(cv, **{"decoder.conv_out.weight": torch.zeros(3, 64, 3, 3)})
    with pytest.raises(ConversionError, match=r"shape mismatch.*decoder\.conv_out\.weight"):
        autoencoder_params_from_compvis(wrong, model)
    with pytest.raises(ConversionError, match="quantize"):  # a KL state dict is not a VQ model
        autoencoder_params_from_diffusers(sd, VQModel(n_embed=16, embed_dim=4, ch=32, ch_mult=(1, 2),
                                                      num_res_blocks=1, resolution=32, z_channels=4))
