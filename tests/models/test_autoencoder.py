"""Autoencoder (Encoder/Decoder/AutoencoderKL/DiagonalGaussian): shapes, parameter counts, layout, closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.convert.diffusers_vae import abstract_params
from lidiff.models.autoencoder import (
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussian,
    ResnetBlock,
    conv_out_apply,
)
from lidiff.models.quantizer import VQModel


def n_params(tree) -> float:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)) / 1e6


def tiny_kl(**kw):
    cfg = dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=4)
    cfg.update(kw)
    return AutoencoderKL(**cfg)


def random_like(abstract, seed=0):
    """Random float32 params shaped like ``abstract`` (biases and norm affines too), without running ``init``.

    (A jitted ``init`` of even a tiny model spends tens of seconds compiling its threefry draws on 2 cores.)
    """
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            return (rng.randn(*a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.randn(*a.shape)).astype(np.float32)
        return (0.1 * rng.randn(*a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def random_params(model, seed=0):
    return random_like(abstract_params(model), seed)


def run(model, params, *args, **kw):
    return model.apply({"params": params}, *args, **kw)


# --------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 4), 4), ((1, 2, 4, 4), 8), ((1, 1, 2, 2, 4), 16),
                                            ((1, 1, 2, 2, 4, 4), 32)])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_tiny_shapes_every_factor(ch_mult, factor, kind):
    res, b = 64, 2
    common = dict(ch=32, ch_mult=ch_mult, num_res_blocks=1, resolution=res, z_channels=4, attn_resolutions=(16,))
    if kind == "kl":
        model = AutoencoderKL(embed_dim=3, **common)
    else:
        model = VQModel(n_embed=16, embed_dim=3, **common)
    assert model.downsample_factor == factor and model.latent_channels == 3
    x = jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32)
    params = abstract_params(model)
    r = res // factor
    if kind == "kl":
        post = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode), params, x)
        assert post.mean.shape == post.logvar.shape == (b, r, r, 3)
        rec, _ = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, jax.random.key(0)), params, x)
    else:
        h = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode), params, x)
        assert h.shape == (b, r, r, 3)
        rec, q = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
        assert q.indices.shape == (b, r, r) and q.indices.dtype == jnp.int32 and q.counts.shape == (16,)
    assert rec.shape == (b, res, res, 3) and rec.dtype == jnp.float32
    feats = jax.eval_shape(
        lambda p: model.apply({"params": p}, jnp.zeros((b, r, r, 3)), method=model.decode_features), params)
    assert feats.shape == (b, res, res, 32)


def test_reference_configs_shapes_and_param_counts():
    """The released first stages: latent shapes and encoder/decoder sizes from ldm-reference §1.2/§2."""
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    kl_f8 = AutoencoderKL(embed_dim=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
    vq_f4 = VQModel(n_embed=8192, embed_dim=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3)
    kl_f16 = AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), z_channels=16, attn_resolutions=(16,))
    kl_f32 = AutoencoderKL(embed_dim=64, ch_mult=(1, 1, 2, 2, 4, 4), z_channels=64, attn_resolutions=(16, 8))
    vq_f4_noattn = VQModel(n_embed=8192, embed_dim=3, ch_mult=(1, 2, 4), z_channels=3, attn_type="none")
    expect = {  # (model, latent shape, encoder M, decoder M, tolerance M)
        "kl-f8": (kl_f8, (1, 32, 32, 4), 34.16, 49.49, 0.01),
        "vq-f4": (vq_f4, (1, 64, 64, 3), 22.34, 32.96, 0.01),
        "kl-f32": (kl_f32, (1, 8, 8, 64), 42.6, 61.2, 0.06),
        "vq-f4-noattn": (vq_f4_noattn, (1, 64, 64, 3), 21.3, 31.9, 0.06),
        "kl-f16": (kl_f16, (1, 16, 16, 16), None, None, None),
    }
    for name, (model, latent, enc_m, dec_m, tol) in expect.items():
        params = abstract_params(model)
        enc = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode), params, x)
        enc = enc.mean if isinstance(model, AutoencoderKL) else enc
        assert enc.shape == latent, name
        if enc_m is not None:
            assert abs(n_params(params["encoder"]) - enc_m) <= tol, (name, n_params(params["encoder"]))
            assert abs(n_params(params["decoder"]) - dec_m) <= tol, (name, n_params(params["decoder"]))
    p = abstract_params(kl_f8)
    assert p["quant_conv"]["kernel"].shape == (1, 1, 8, 8) and p["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)
    assert p["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 8)
    assert p["decoder"]["conv_out"]["kernel"].shape == (3, 3, 128, 3)
    assert p["decoder"]["up_1"]["block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 512, 256)
    p = abstract_params(vq_f4)
    assert p["quantize"]["embedding"]["embedding"].shape == (8192, 3)
    assert "upsample" not in p["decoder"]["up_0"] and "downsample" not in p["encoder"]["down_2"]


def test_attention_placement_follows_resolution():
    """kl-f16 layout: attention at the 16x16 level only (encoder level 4, decoder level 4), mid attn always."""
    p = abstract_params(AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), z_channels=16, attn_resolutions=(16,)))
    for part, prefix, n_blocks in (("encoder", "down", 2), ("decoder", "up", 3)):
        for i in range(5):
            level = p[part][f"{prefix}_{i}"]
            attn = sorted(k for k in level if k.startswith("attn_"))
            assert attn == ([f"attn_{j}" for j in range(n_blocks)] if i == 4 else []), (part, i, attn)
            assert sorted(k for k in level if k.startswith("block_")) == [f"block_{j}" for j in range(n_blocks)]
        assert set(p[part]["mid"]) == {"block_1", "attn_1", "block_2"}
        assert set(p[part]["mid"]["attn_1"]) == {"norm", "q", "k", "v", "proj_out"}
    p = abstract_params(tiny_kl(attn_type="none", attn_resolutions=(16, 8)))
    for part in ("encoder", "decoder"):
        assert set(p[part]["mid"]) == {"block_1", "block_2"}
        assert not any(k.startswith("attn") for lvl in p[part].values() for k in lvl)


def test_unknown_attn_type_refused():
    with pytest.raises(ValueError, match="attn_type"):
        random_params(tiny_kl(attn_type="linear"))


# --------------------------------------------------------------------------------------------- blocks


def test_resnet_block_shortcut_and_residual():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    blk = ResnetBlock(64)
    p = random_like(jax.eval_shape(blk.init, jax.random.key(1), x)["params"])
    assert set(p) == {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
    assert run(blk, p, x).shape == (2, 8, 8, 64)
    same = ResnetBlock(32)
    p = random_like(jax.eval_shape(same.init, jax.random.key(1), x)["params"])
    assert "nin_shortcut" not in p
    out = run(same, p, x)
    assert float(jnp.abs(out - x).max()) > 1e-3
    p = jax.tree.map(jnp.zeros_like, p)  # conv2 zero -> the block is the identity
    np.testing.assert_allclose(run(same, p, x), x, atol=1e-6)


def test_attn_block_kernels_agree_and_match_explicit_formula():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    blk = AttnBlock(attention_kernel="xla")
    p = random_like(jax.eval_shape(blk.init, jax.random.key(1), x)["params"])
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)
    out_xla = run(blk, p, x)
    out_ref = run(AttnBlock(attention_kernel="reference"), p, x)
    np.testing.assert_allclose(out_xla, out_ref, atol=1e-5)
    # explicit single-head attention with scale C**-0.5
    gn = p["norm"]
    xg = x.reshape(2, 16, 32, 1)
    xn = (xg - xg.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(xg.var(axis=(1, 3), keepdims=True) + 1e-6)
    xn = xn.reshape(2, 16, 32) * gn["scale"] + gn["bias"]
    lin = lambda name, a: a @ p[name]["kernel"][0, 0] + p[name]["bias"]  # noqa: E731
    q, k, v = lin("q", xn), lin("k", xn), lin("v", xn)
    w = jax.nn.softmax(jnp.einsum("btc,bsc->bts", q, k) / math.sqrt(32), axis=-1)
    want = x + lin("proj_out", jnp.einsum("bts,bsc->btc", w, v)).reshape(2, 4, 4, 32)
    np.testing.assert_allclose(out_xla, want, atol=1e-4)


# --------------------------------------------------------------------------------------------- model


def test_conv_out_apply_recomputes_the_decoder_output():
    model = tiny_kl()
    params = random_params(model)
    z = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    x_dec = run(model, params, z, method=model.decode)
    h = run(model, params, z, method=model.decode_features)
    assert h.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(conv_out_apply(params["decoder"]["conv_out"], h), x_dec, rtol=1e-5, atol=1e-6)
    # via __call__(return_features=True), and the kernel is a real input of the recomputation
    x = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3), minval=-1, maxval=1)
    h2, post = run(model, params, x, sample_posterior=False, return_features=True)
    rec, _ = run(model, params, x, sample_posterior=False)
    np.testing.assert_allclose(conv_out_apply(params["decoder"]["conv_out"], h2), rec, rtol=1e-5, atol=1e-6)
    co = params["decoder"]["conv_out"]
    g = jax.grad(lambda k: jnp.sum(conv_out_apply({"kernel": k, "bias": co["bias"]}, h2) ** 2))(co["kernel"])
    assert g.shape == co["kernel"].shape and float(jnp.abs(g).sum()) > 0


def test_call_samples_posterior_with_the_given_rng():
    model = tiny_kl()
    params = random_params(model)
    x = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3), minval=-1, maxval=1)
    post = run(model, params, x, method=model.encode)
    a, _ = run(model, params, x, jax.random.key(7))
    b, _ = run(model, params, x, jax.random.key(7))
    c, _ = run(model, params, x, jax.random.key(8))
    want = run(model, params, post.sample(jax.random.key(7)), method=model.decode)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(a - c).max()) > 1e-4
    mode, _ = run(model, params, x, sample_posterior=False)
    np.testing.assert_allclose(mode, run(model, params, post.mean, method=model.decode), atol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        run(model, params, x)


def test_dropout_only_when_not_deterministic():
    model = tiny_kl(dropout=0.5)
    params = random_params(model)
    x = jax.random.uniform(jax.random.key(4), (1, 16, 16, 3), minval=-1, maxval=1)
    det1, _ = run(model, params, x, sample_posterior=False)  # deterministic=True by default
    drop, _ = jax.jit(lambda p, k: model.apply({"params": p}, x, sample_posterior=False, deterministic=False,
                                               rngs={"dropout": k}))(params, jax.random.key(0))
    assert float(jnp.abs(drop - det1).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = tiny_kl(dtype=jnp.bfloat16)
    params = random_params(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    x = jax.random.uniform(jax.random.key(4), (1, 16, 16, 3), minval=-1, maxval=1)
    rec, post = run(model, params, x, sample_posterior=False)
    assert rec.dtype == jnp.float32 and post.mean.dtype == jnp.float32
    ref, _ = run(tiny_kl(), params, x, sample_posterior=False)
    rel = float(jnp.linalg.norm(rec - ref) / jnp.linalg.norm(ref))
    assert rel < 5e-2, rel


# --------------------------------------------------------------------------------------------- DiagonalGaussian


def test_kl_of_standard_normal_is_zero():
    g = DiagonalGaussian.from_mean_logvar(jnp.zeros((3, 4, 4, 2)), jnp.zeros((3, 4, 4, 2)))
    np.testing.assert_allclose(g.kl(), np.zeros(3), atol=1e-7)
    assert g.kl().shape == (3,)


def test_kl_and_nll_match_closed_forms():
    rng = np.random.RandomState(0)
    mean, logvar = rng.randn(2, 3, 3, 4), rng.randn(2, 3, 3, 4)
    moments = np.concatenate([mean, logvar], axis=-1).astype(np.float32)
    g = DiagonalGaussian.from_moments(jnp.asarray(moments))
    np.testing.assert_allclose(g.mean, mean, rtol=1e-6)  # mean is the FIRST half of the channels
    np.testing.assert_allclose(g.var, np.exp(logvar), rtol=1e-5)
    np.testing.assert_allclose(g.std, np.exp(0.5 * logvar), rtol=1e-5)
    want_kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(g.kl(), want_kl, rtol=1e-5)
    m2, lv2 = rng.randn(2, 3, 3, 4), rng.randn(2, 3, 3, 4)
    other = DiagonalGaussian.from_mean_logvar(jnp.asarray(m2, jnp.float32), jnp.asarray(lv2, jnp.float32))
    want = 0.5 * np.sum((mean - m2) ** 2 / np.exp(lv2) + np.exp(logvar - lv2) - 1 - logvar + lv2, axis=(1, 2, 3))
    np.testing.assert_allclose(g.kl(other), want, rtol=1e-5)
    x = rng.randn(2, 3, 3, 4)
    want_nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / np.exp(logvar), axis=(1, 2, 3))
    np.testing.assert_allclose(g.nll(jnp.asarray(x, jnp.float32)), want_nll, rtol=1e-5)
    np.testing.assert_array_equal(g.mode(), g.mean)


def test_sample_has_the_right_moments():
    mean = jnp.array([[[[2.0, -1.0]]]])
    logvar = jnp.log(jnp.array([[[[0.25, 4.0]]]]))
    g = DiagonalGaussian.from_mean_logvar(mean, logvar)
    draws = jax.vmap(g.sample)(jax.random.split(jax.random.key(0), 20000))[:, 0, 0, 0]
    np.testing.assert_allclose(draws.mean(0), [2.0, -1.0], atol=0.05)
    np.testing.assert_allclose(draws.std(0), [0.5, 2.0], rtol=0.03)


def test_logvar_is_clamped():
    moments = jnp.array([[[[0.0, 0.0, -100.0, 100.0]]]])
    g = DiagonalGaussian.from_moments(moments)
    np.testing.assert_allclose(g.logvar, [[[[-30.0, 20.0]]]])
    assert np.isfinite(np.asarray(g.kl())).all()


def test_posterior_is_a_pytree():
    g = DiagonalGaussian.from_moments(jnp.ones((1, 2, 2, 4)))
    out = jax.jit(lambda d: d.kl())(g)
    assert out.shape == (1,)
    assert len(jax.tree.leaves(g)) == 2
