"""VectorQuantizer and VQModel: lookup, straight-through gradient, losses, usage statistics, dead-code fixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.convert.diffusers_vae import abstract_params
from lidiff.models.autoencoder import conv_out_apply
from lidiff.models.quantizer import (
    QuantizerOutput,
    VectorQuantizer,
    VQModel,
    code_statistics,
    nearest_code,
    restart_dead_codes,
    update_code_counts,
)


def qparams(codebook):
    return {"embedding": {"embedding": jnp.asarray(codebook, jnp.float32)}}


def quantize(codebook, z, **kw):
    codebook = np.asarray(codebook)
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kw)
    return vq.apply({"params": qparams(codebook)}, jnp.asarray(z, jnp.float32))


def random_like(abstract, seed=0):
    """Random float32 params shaped like ``abstract``, without running ``init`` (slow to compile on 2 cores)."""
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            return (rng.randn(*a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.randn(*a.shape)).astype(np.float32)
        if name == "embedding":
            return rng.randn(*a.shape).astype(np.float32)
        return (0.1 * rng.randn(*a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def test_init_codebook_is_uniform_in_plus_minus_one_over_n():
    vq = VectorQuantizer(64, 3)
    params = vq.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))["params"]
    cb = np.asarray(params["embedding"]["embedding"])
    assert cb.shape == (64, 3) and cb.dtype == np.float32
    assert cb.min() >= -1 / 64 and cb.max() <= 1 / 64 and cb.std() > 0.3 / 64


def test_indices_are_the_l2_nearest_codes():
    rng = np.random.RandomState(0)
    cb, z = rng.randn(32, 4), rng.randn(2, 5, 5, 4)
    out = quantize(cb, z)
    assert isinstance(out, QuantizerOutput)
    assert out.indices.shape == (2, 5, 5) and out.indices.dtype == jnp.int32
    idx = np.asarray(out.indices)
    assert idx.min() >= 0 and idx.max() < 32
    brute = np.argmin(((z[..., None, :] - cb) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(idx, brute)
    np.testing.assert_allclose(out.z_q, cb[brute], rtol=1e-6, atol=1e-6)  # forward value = the codes
    assert out.counts.shape == (32,) and float(out.counts.sum()) == 50
    np.testing.assert_array_equal(out.counts, np.bincount(brute.ravel(), minlength=32))


def test_distance_never_builds_an_n_by_k_by_d_tensor():
    n, k, d = 48, 40, 5
    jaxpr = jax.make_jaxpr(nearest_code)(jnp.zeros((n, d)), jnp.zeros((k, d)))
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert (n, k) in shapes
    assert not any(np.prod(s) >= n * k * d for s in shapes), shapes


def test_straight_through_gradient_is_identity():
    rng = np.random.RandomState(1)
    cb, z, g = rng.randn(16, 3), rng.randn(2, 4, 4, 3), rng.randn(2, 4, 4, 3)
    vq = VectorQuantizer(16, 3)
    grad = jax.grad(lambda z: jnp.sum(vq.apply({"params": qparams(cb)}, z).z_q * g))(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(grad, g, rtol=1e-6)


def test_loss_is_zero_when_every_latent_is_a_code():
    rng = np.random.RandomState(2)
    cb = rng.randn(16, 3)
    z = cb[rng.randint(0, 16, size=(2, 3, 3))]
    for legacy in (True, False):
        out = quantize(cb, z, legacy=legacy)
        assert float(out.loss) == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(out.z_q, z, atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_beta_placement_legacy_vs_not(legacy):
    """legacy: beta weighs the codebook term (gradient w.r.t. codes); otherwise it weighs the commitment term."""
    rng = np.random.RandomState(3)
    beta = 0.25
    cb = rng.randn(8, 3).astype(np.float32)
    z = rng.randn(1, 4, 4, 3).astype(np.float32)
    vq = VectorQuantizer(8, 3, beta=beta, legacy=legacy)

    def loss(params, z):
        return vq.apply({"params": params}, z).loss

    g_params, g_z = jax.grad(loss, argnums=(0, 1))(qparams(cb), jnp.asarray(z))
    g_cb = np.asarray(g_params["embedding"]["embedding"])
    idx = np.argmin(((z[..., None, :] - cb) ** 2).sum(-1), axis=-1)
    e = cb[idx]
    mse = np.mean((e - z) ** 2)
    n = z.size
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    np.testing.assert_allclose(float(loss(qparams(cb), jnp.asarray(z))), (w_commit + w_code) * mse, rtol=1e-5)
    np.testing.assert_allclose(g_z, w_commit * 2 * (z - e) / n, rtol=1e-5, atol=1e-7)
    want_cb = np.zeros_like(cb)
    np.add.at(want_cb, idx.ravel(), (w_code * 2 * (e - z) / n).reshape(-1, 3))
    np.testing.assert_allclose(g_cb, want_cb, rtol=1e-5, atol=1e-7)


def test_perplexity_and_usage_of_uniform_usage():
    cb = np.arange(8)[:, None] * np.ones((1, 4))  # 8 distinct codes
    for used in (1, 3, 8):
        idx = np.tile(np.arange(used), 6)
        out = quantize(cb, cb[idx].reshape(1, 1, -1, 4))
        assert float(out.perplexity) == pytest.approx(used, rel=1e-4)
        assert float(out.codebook_usage) == pytest.approx(used / 8)
    counts, ppl, usage = code_statistics(jnp.array([0, 0, 0, 1]), 4)
    np.testing.assert_array_equal(counts, [3, 1, 0, 0])
    assert float(ppl) == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))), rel=1e-5)
    assert float(usage) == 0.5


def test_code_count_ema():
    ema = update_code_counts(jnp.array([10.0, 0.0]), jnp.array([0.0, 4.0]), decay=0.9)
    np.testing.assert_allclose(ema, [9.0, 0.4], rtol=1e-6)


def test_restart_moves_dead_codes_onto_encoder_outputs():
    rng = np.random.RandomState(4)
    z_flat = (rng.randn(64, 3) + 5.0).astype(np.float32)  # data far from the codebook
    cb = np.concatenate([np.array([[5.0, 5.0, 5.0]]), rng.randn(7, 3) * 0.01]).astype(np.float32)
    before = quantize(cb, z_flat.reshape(1, 8, 8, 3))
    assert float(before.codebook_usage) == 1 / 8  # only code 0 is ever chosen: 7 dead codes
    counts_ema = before.counts
    new_cb = np.asarray(restart_dead_codes(jnp.asarray(cb), counts_ema, jnp.asarray(z_flat), jax.random.key(0),
                                           threshold=1.0))
    np.testing.assert_array_equal(new_cb[0], cb[0])  # the live code stays
    for row in new_cb[1:]:  # every dead code now sits exactly on an encoder output
        assert np.min(np.abs(z_flat - row).sum(-1)) == 0.0
    after = quantize(new_cb, z_flat.reshape(1, 8, 8, 3))
    assert float(after.codebook_usage) > 0.5  # the restarted codes get used
    assert float(after.perplexity) > float(before.perplexity) + 1.0


def test_l2_normalized_lookup_is_cosine():
    cb = np.array([[10.0, 0.0], [0.1, 0.1]])
    z = np.array([1.0, 0.1]).reshape(1, 1, 1, 2)
    assert int(quantize(cb, z).indices[0, 0, 0]) == 1  # L2: the small code is nearer
    out = quantize(cb, z, use_l2_normalized_codes=True)
    assert int(out.indices[0, 0, 0]) == 0  # cosine: the code pointing the same way
    np.testing.assert_allclose(out.z_q[0, 0, 0], [1.0, 0.0], atol=1e-6)  # unit-norm code
    # data on a quarter circle of radius 5: the tiny code along +x is dead under L2, alive under cosine lookup
    theta = np.linspace(0.0, np.pi / 2, 16)
    z = (5.0 * np.stack([np.cos(theta), np.sin(theta)], -1)).reshape(1, 4, 4, 2)
    cb = np.array([[3.5, 3.5], [0.01, 0.0]])
    assert float(quantize(cb, z).codebook_usage) == 0.5
    assert float(quantize(cb, z, use_l2_normalized_codes=True).codebook_usage) == 1.0


# --------------------------------------------------------------------------------------------- VQModel


def tiny_vq(**kw):
    cfg = dict(n_embed=32, embed_dim=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=4)
    cfg.update(kw)
    return VQModel(**cfg)


def test_vq_model_paths_agree():
    model = tiny_vq()
    params = random_like(abstract_params(model))
    assert set(params) == {"encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"}
    assert params["quant_conv"]["kernel"].shape == (1, 1, 4, 3)
    assert params["post_quant_conv"]["kernel"].shape == (1, 1, 3, 4)
    apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)  # noqa: E731
    x = jnp.asarray(np.random.RandomState(6).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    h = apply(x, method=model.encode)
    assert h.shape == (2, 8, 8, 3) and h.dtype == jnp.float32
    z_q, q = apply(h, method=model.quantize_latent)
    cb = params["quantize"]["embedding"]["embedding"]
    np.testing.assert_allclose(z_q, cb[np.asarray(q.indices)], rtol=1e-5, atol=1e-6)
    rec, q_call = apply(x)
    np.testing.assert_array_equal(q_call.indices, q.indices)
    np.testing.assert_allclose(apply(h, method=model.decode), rec, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply(q.indices, method=model.decode_code), rec, rtol=1e-4, atol=1e-5)
    # decode quantises: decoding h differs from decoding h unquantised
    assert float(jnp.abs(apply(h, method=model.decode_quantized) - rec).max()) > 1e-4
    feats, _ = apply(x, return_features=True)
    assert feats.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(conv_out_apply(params["decoder"]["conv_out"], feats), rec, rtol=1e-4, atol=1e-5)


def test_vq_model_straight_through_reaches_the_encoder():
    model = tiny_vq()
    params = random_like(abstract_params(model))
    x = jnp.asarray(np.random.RandomState(7).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)

    def rec_loss(p):
        rec, _ = model.apply({"params": p}, x)
        return jnp.mean((rec - x) ** 2)

    g = jax.jit(jax.grad(rec_loss))(params)
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["quantize"]["embedding"]["embedding"]).sum()) == 0  # the codebook learns from q loss only
