"""LDM UNet: CompVis structure and parameter counts, head rules, attention blocks vs diffusers, dtype policy,
remat, attention kernels, class embedder."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lidiff.convert.common import convert_state_dict, flatten, unflatten
from lidiff.convert.diffusers_unet import compvis_unet_keys
from lidiff.models.conditioning import ClassEmbedder
from lidiff.models.unet import UNetModel, attention_heads, unet_param_shapes
from lidiff.nn.embeddings import timestep_embedding
from lidiff.nn.transformer import AttentionBlock, SpatialTransformer

CELEBA = dict(
    in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
    attention_resolutions=(8, 4, 2), num_head_channels=32,
)
CIN256_V2 = dict(
    in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
    attention_resolutions=(8, 4, 2), num_heads=1, use_spatial_transformer=True, transformer_depth=1, context_dim=512,
)
TXT2IMG_1P4B = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), num_heads=8, legacy=False, use_spatial_transformer=True, transformer_depth=1,
    context_dim=1280,
)
# A tiny cross-attention + class-conditioned UNet for the dtype / remat / kernel / conditioning tests: one level of
# width 64 (at width 32, GroupNorm(32) has one channel per group and cancels the timestep/class shift), attention
# only in the middle block. The full multi-level structure is covered by tests/convert/test_diffusers_unet.py.
TINY = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(2,), num_res_blocks=1,
    attention_resolutions=(), num_heads=2, use_spatial_transformer=True, context_dim=16, num_classes=3,
    attention_kernel="xla",
)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _random_params(model, seed=0, std=0.1):
    """Every param random (zero-init ones too); norm scales around 1."""
    rng = np.random.default_rng(seed)
    flat = flatten(unet_param_shapes(model))
    return unflatten({
        path: jnp.asarray(rng.normal(size=s.shape) * std + (1.0 if path[-1] == "scale" else 0.0), jnp.float32)
        for path, s in flat.items()
    })


def _tiny_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([5, 900], jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
    y = jnp.asarray([0, 2], jnp.int32)
    return x, t, ctx, y


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "config, millions",
    [(CELEBA, 274.06), (CIN256_V2, 400.92), (TXT2IMG_1P4B, 872.30)],
    ids=["celebahq", "cin256-v2", "txt2img-1p4B"],
)
def test_reference_param_counts(config, millions):
    n = _count(unet_param_shapes(UNetModel(**config)))
    assert abs(n / 1e6 - millions) < 0.005, n


def test_celebahq_tree_follows_compvis_names():
    flat = {"/".join(p): tuple(s.shape) for p, s in flatten(unet_param_shapes(UNetModel(**CELEBA))).items()}
    expect = {
        "time_embed_0/kernel": (224, 896),
        "time_embed_2/kernel": (896, 896),
        "input_blocks_0_0/kernel": (3, 3, 3, 224),
        "input_blocks_3_0/op/kernel": (3, 3, 224, 224),
        "input_blocks_4_0/skip_connection/kernel": (1, 1, 224, 448),
        "input_blocks_4_0/emb_layers_1/kernel": (896, 448),
        "input_blocks_4_1/norm/scale": (448,),
        "input_blocks_4_1/q/kernel": (448, 448),
        "input_blocks_4_1/proj_out/kernel": (448, 448),
        "input_blocks_11_1/v/bias": (896,),
        "middle_block_1/k/kernel": (896, 896),
        "middle_block_2/out_layers_3/kernel": (3, 3, 896, 896),
        "output_blocks_0_0/in_layers_0/scale": (1792,),
        "output_blocks_2_0/in_layers_2/kernel": (3, 3, 1568, 896),
        "output_blocks_2_2/conv/kernel": (3, 3, 896, 896),
        "output_blocks_5_2/conv/kernel": (3, 3, 672, 672),
        "output_blocks_8_2/conv/kernel": (3, 3, 448, 448),
        "output_blocks_9_0/skip_connection/kernel": (1, 1, 672, 224),
        "out_0/scale": (224,),
        "out_2/kernel": (3, 3, 224, 3),
    }
    for path, shape in expect.items():
        assert flat.get(path) == shape, (path, flat.get(path))
    blocks = {p.split("/")[0] for p in flat}
    assert {b for b in blocks if b.startswith("input_blocks_")} == {
        f"input_blocks_{i}_{j}" for i in range(12) for j in range(2) if j == 0 or i in (4, 5, 7, 8, 10, 11)
    }
    assert not any(p.startswith(("input_blocks_1_1", "output_blocks_9_1", "output_blocks_11_1")) for p in flat)
    assert not any("skip_connection" in p for p in flat if p.startswith(("input_blocks_1_", "input_blocks_5_")))
    # The CelebA checkpoint's 370 ``model_ema.*`` entries (reference §3.1) are these 368 parameters plus
    # ``model_ema.decay`` and ``model_ema.num_updates``.
    assert len(compvis_unet_keys(UNetModel(**CELEBA))) == 368


def test_attention_heads_follow_compvis_rules():
    # CelebA: plain attention, num_head_channels 32 -> 14 / 21 / 28 heads of 32.
    assert [attention_heads(c, -1, 32, True, False) for c in (448, 672, 896)] == [(14, 32), (21, 32), (28, 32)]
    # cin256-v2: legacy, num_heads 1 -> one head as wide as the block.
    assert [attention_heads(c, 1, -1, True, True) for c in (384, 576, 960)] == [(1, 384), (1, 576), (1, 960)]
    # txt2img: legacy False, 8 heads -> head width ch/8.
    assert [attention_heads(c, 8, -1, False, True) for c in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
    # legacy spatial transformer with num_head_channels: heads = ch // hc, width = ch // heads.
    assert attention_heads(96, -1, 40, True, True) == (2, 48)
    assert attention_heads(96, -1, 32, False, True) == (3, 32)
    # plain attention with num_heads: legacy splits into num_heads; non-legacy into ch // (ch // num_heads).
    assert attention_heads(64, 4, -1, True, False) == (4, 16)
    assert attention_heads(64, 4, -1, False, False) == (4, 16)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        attention_heads(64, -1, -1, True, False)


def test_timestep_embedding_is_cos_then_sin():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999, 250.5], np.float32)
    ours = np.asarray(timestep_embedding(jnp.asarray(t), 64), np.float64)
    freqs = np.exp(-np.log(1e4) * np.arange(32) / 32)
    exact = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)  # float64
    # Tolerance from the float32 arithmetic: the argument t * f is rounded to 2**-24 relative (about t * 6e-8
    # radians at t ~ 1000, where the argument reaches 1000 rad), the frequency f itself carries ~2 roundings
    # (exp of a rounded product), and cos/sin add ~1 ulp: |error| <= 4 * 2**-24 * t + 2**-23 per row.
    eps = np.finfo(np.float32).eps
    tol = (2 * eps * np.maximum(t, 1.0) + eps)[:, None]
    assert np.all(np.abs(ours - exact) <= tol), np.max(np.abs(ours - exact) / tol)
    ref = get_timestep_embedding(torch.from_numpy(t), 64, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    assert np.all(np.abs(ours - ref) <= 2 * tol)  # diffusers' float32 result carries the same error bound
    assert np.max(np.abs(ours[:, :32] - np.sin(t[:, None] * freqs))) > 0.5  # cos first: the halves are not swapped
    odd = np.asarray(timestep_embedding(jnp.asarray(t), 7))
    assert odd.shape == (5, 7) and np.all(odd[:, -1] == 0)


def _randomize_torch(module, seed):
    """Every parameter random, zero-initialised ones included; norm weights around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if is_norm_weight else 0.0))
    return module.eval()


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_spatial_transformer_matches_diffusers(use_linear):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    c, heads, d, ctx_dim = 64, 2, 32, 24
    ref = _randomize_torch(
        Transformer2DModel(heads, d, in_channels=c, num_layers=2, cross_attention_dim=ctx_dim, norm_num_groups=32,
                           use_linear_projection=use_linear),
        seed=1,
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5, c)).astype(np.float32)
    ctx = rng.normal(size=(2, 7, ctx_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(ctx)).sample
    want = want.numpy().transpose(0, 2, 3, 1)
    block = SpatialTransformer(heads, d, depth=2, context_dim=ctx_dim, use_linear=use_linear)
    target = jax.eval_shape(block.init, jax.random.key(0), x, ctx)["params"]
    params = convert_state_dict(ref.state_dict(), target)
    got = block.apply({"params": params}, x, ctx)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)


def test_attention_block_matches_diffusers_attention():
    from diffusers.models.attention_processor import Attention

    c, d = 64, 16
    ref = _randomize_torch(
        Attention(c, heads=c // d, dim_head=d, norm_num_groups=32, eps=1e-5, residual_connection=True, bias=True,
                  upcast_softmax=True, _from_deprecated_attn_block=True),
        seed=2,
    )
    x = np.random.default_rng(2).normal(size=(2, 4, 6, c)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    renamed = {
        k.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
        .replace("to_out.0", "proj_out"): v
        for k, v in ref.state_dict().items()
    }
    block = AttentionBlock(c // d)
    params = convert_state_dict(renamed, jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    np.testing.assert_allclose(np.asarray(block.apply({"params": params}, x)), want, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    """(params, inputs, compiled float32 apply, its output) of the TINY UNet, shared by the tests below."""
    params = _random_params(UNetModel(**TINY), std=0.1)
    inputs = _tiny_inputs()
    apply = jax.jit(UNetModel(**TINY).apply, static_argnames=("deterministic",))
    return params, inputs, apply, apply({"params": params}, *inputs)


def test_bfloat16_policy_keeps_float32_params_and_output(tiny):
    params, inputs, _, want = tiny
    bf16 = UNetModel(**TINY, dtype=jnp.bfloat16)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(unet_param_shapes(bf16)))
    got = jax.jit(bf16.apply)({"params": params}, *inputs)
    assert got.dtype == jnp.float32 and got.shape == (2, 8, 8, 4)
    assert _rel(got, want) < 5e-2


def test_remat_gives_same_output_and_gradient(tiny):
    params, inputs, _, _ = tiny

    def value_and_grad(model):
        def f(p):
            out = model.apply({"params": p}, *inputs)
            return jnp.mean(out**2), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (l0, out0), g0 = value_and_grad(UNetModel(**TINY))
    (l1, out1), g1 = value_and_grad(UNetModel(**TINY, remat=True))
    assert jax.tree.structure(unet_param_shapes(UNetModel(**TINY, remat=True))) == jax.tree.structure(params)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    gnorm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(g0)))
    assert gnorm > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * gnorm)


def test_attention_kernels_agree_spatial_transformer(tiny):
    params, inputs, _, want_xla = tiny
    got = jax.jit(UNetModel(**dict(TINY, attention_kernel="reference")).apply)({"params": params}, *inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want_xla), rtol=1e-4, atol=1e-5)


def test_attention_kernels_agree_self_attention():
    cfg = dict(TINY, use_spatial_transformer=False, context_dim=None, num_head_channels=16)
    x, t, _, y = _tiny_inputs(2)
    params = _random_params(UNetModel(**cfg), seed=2)
    outs = {k: jax.jit(UNetModel(**dict(cfg, attention_kernel=k)).apply)({"params": params}, x, t, None, y)
            for k in ("xla", "reference")}
    np.testing.assert_allclose(np.asarray(outs["xla"]), np.asarray(outs["reference"]), rtol=1e-4, atol=1e-5)


def test_conditioning_changes_output_and_bad_inputs_are_refused(tiny):
    params, (x, t, ctx, y), apply, base = tiny
    assert _rel(apply({"params": params}, x, t, ctx, (y + 1) % 3), base) > 1e-3
    assert _rel(apply({"params": params}, x, t, -ctx, y), base) > 1e-3
    assert _rel(apply({"params": params}, x, t + 50, ctx, y), base) > 1e-3
    model = UNetModel(**TINY)
    with pytest.raises(ValueError, match="class labels"):
        model.apply({"params": params}, x, t, ctx)
    two_levels = UNetModel(**dict(TINY, channel_mult=(2, 2)))
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(lambda: two_levels.init(jax.random.key(0), x[:, :7, :7], t, ctx, y))
    plain = UNetModel(**dict(TINY, use_spatial_transformer=False, context_dim=None))
    with pytest.raises(ValueError, match="cross-attention"):
        jax.eval_shape(lambda: plain.init(jax.random.key(0), x, t, ctx, y))


def test_dropout_is_active_only_when_not_deterministic(tiny):
    params, inputs, _, base = tiny
    apply = jax.jit(UNetModel(**dict(TINY, dropout=0.5)).apply, static_argnames=("deterministic",))
    np.testing.assert_allclose(np.asarray(apply({"params": params}, *inputs)), np.asarray(base), rtol=1e-6, atol=1e-6)
    drop = apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert _rel(drop, base) > 1e-2


def test_class_embedder_is_a_length_one_context():
    table = np.random.default_rng(5).normal(size=(11, 8)).astype(np.float32)
    embedder = ClassEmbedder(embed_dim=8, n_classes=11)
    target = jax.eval_shape(embedder.init, jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
    params = convert_state_dict({"embedding.weight": table}, target)
    labels = jnp.asarray([10, 0, 3])
    ctx = embedder.apply({"params": params}, labels)
    assert ctx.shape == (3, 1, 8) and ctx.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ctx[:, 0]), table[[10, 0, 3]])
    init = embedder.init(jax.random.key(0), labels)["params"]["embedding"]["embedding"]
    assert init.shape == (11, 8) and 0.5 < float(jnp.std(init)) < 1.5  # torch's N(0, 1) init
