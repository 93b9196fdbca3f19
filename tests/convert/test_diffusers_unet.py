"""UNet converters: forward parity with diffusers UNet2DModel / UNet2DConditionModel on random weights, CompVis
naming (legacy per-head qkv packing) round trip, EMA entries, strictness."""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from lidiff.convert.common import ConversionError, convert_state_dict, flatten
from lidiff.convert.diffusers_unet import (
    COMPVIS_EMA_PREFIX,
    compvis_unet_keys,
    diffusers_unet_to_compvis,
    pack_legacy_qkv,
    split_compvis_qkv,
    split_legacy_qkv,
    unet_params_from_compvis,
    unet_params_from_diffusers,
)
from lidiff.models.unet import UNetModel
from lidiff.nn.transformer import AttentionBlock

# name: (diffusers class, diffusers kwargs, lidiff UNetModel kwargs, uses context)
CASES = {
    # CelebA-style: plain attention at ds 2 and 4 (levels 1, 2), attention_head_dim = num_head_channels.
    "unet2d_default": (
        UNet2DModel,
        dict(
            block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16, in_channels=3, out_channels=3,
        ),
        dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
             attention_resolutions=(2, 4), num_head_channels=16),
        False,
    ),
    # use_scale_shift_norm + resblock_updown + adm class embedding.
    "unet2d_scale_shift_updown": (
        UNet2DModel,
        dict(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
            downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
            attn_norm_num_groups=32, attention_head_dim=32, num_class_embeds=7, in_channels=3, out_channels=3,
        ),
        dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(2,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
             num_classes=7),
        False,
    ),
    # txt2img-style: conv proj_in, fixed number of heads (legacy False), class embedding, cross-attention at ds 1.
    "cond_conv_proj": (
        UNet2DConditionModel,
        dict(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2, cross_attention_dim=24, num_class_embeds=5, use_linear_projection=False,
            in_channels=4, out_channels=4,
        ),
        dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(1,), num_heads=2, legacy=False, use_spatial_transformer=True, context_dim=24,
             num_classes=5),
        True,
    ),
    # SD2-style: linear proj_in, num_head_channels 16 (heads per level 2, 4), depth 2, attention at every level.
    "cond_linear_proj": (
        UNet2DConditionModel,
        dict(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=24, transformer_layers_per_block=2,
            num_class_embeds=5, use_linear_projection=True, in_channels=4, out_channels=4,
        ),
        dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(1, 2), num_head_channels=16, use_spatial_transformer=True, context_dim=24,
             transformer_depth=2, use_linear_in_transformer=True, num_classes=5),
        True,
    ),
}
# CompVis-equivalent settings every case shares.
COMMON = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32, downsample_padding=1,
              act_fn="silu", center_input_sample=False, sample_size=16)


def _randomize(module, seed):
    """Every parameter random, zero-initialised ones (conv_out, proj_out, biases) included; norm weights ~1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm_weight else 0.0))
    return module.eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, torch model, lidiff model, inputs, torch output NHWC, params converted from diffusers)."""
    cls, torch_kwargs, lidiff_kwargs, uses_context = CASES[request.param]
    ref = _randomize(cls(**COMMON, **torch_kwargs), seed=len(request.param))
    model = UNetModel(**lidiff_kwargs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, lidiff_kwargs["in_channels"])).astype(np.float32)
    t = np.array([3, 721], np.int64)
    ctx = rng.normal(size=(2, 5, 24)).astype(np.float32) if uses_context else None
    y = np.array([1, 4], np.int64) if "num_classes" in lidiff_kwargs else None
    kwargs = {}
    if uses_context:
        kwargs["encoder_hidden_states"] = torch.from_numpy(ctx)
    if y is not None:
        kwargs["class_labels"] = torch.from_numpy(y)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), **kwargs).sample
    params = unet_params_from_diffusers(ref.state_dict(), model)
    return request.param, ref, model, (x, t, ctx, y), want.numpy().transpose(0, 2, 3, 1), params


def test_forward_matches_diffusers(case):
    name, _, model, (x, t, ctx, y), want, params = case
    labels = None if y is None else y.astype(np.int32)
    got = jax.jit(model.apply)({"params": params}, x, t.astype(np.int32), ctx, labels)
    assert got.shape == want.shape
    err = _rel(got, want)
    assert err < 1e-4, (name, err)


def test_compvis_naming_round_trip(case):
    name, ref, model, _, _, params = case
    compvis = diffusers_unet_to_compvis(ref.state_dict(), model)
    assert sorted(compvis) == compvis_unet_keys(model)
    if not model.use_spatial_transformer:  # plain attention: the legacy Conv1d layouts
        c = 64
        assert compvis["middle_block.1.qkv.weight"].shape == (3 * c, c, 1)
        assert compvis["middle_block.1.qkv.bias"].shape == (3 * c,)
        assert compvis["middle_block.1.proj_out.weight"].shape == (c, c, 1)
        assert not any(k.endswith((".q.weight", ".k.weight", ".v.weight")) for k in compvis)
    # A whole LDM checkpoint: the UNet under model.diffusion_model., other components alongside.
    ckpt = {"model.diffusion_model." + k: v for k, v in compvis.items()}
    ckpt.update({"first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3)), "betas": np.zeros(1000)})
    back = unet_params_from_compvis(ckpt, model)
    flat, flat_back = flatten(params), flatten(back)
    assert flat.keys() == flat_back.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_back[path], flat[path], err_msg="/".join(path))
    # bare UNet keys load the same
    bare = flatten(unet_params_from_compvis(compvis, model))
    assert all(np.array_equal(bare[p], flat[p]) for p in flat)


def test_compvis_ema_entries_load():
    _, torch_kwargs, lidiff_kwargs, _ = CASES["unet2d_scale_shift_updown"]
    ref = _randomize(UNet2DModel(**COMMON, **torch_kwargs), seed=3)
    model = UNetModel(**lidiff_kwargs)
    compvis = diffusers_unet_to_compvis(ref.state_dict(), model)
    ckpt = {"model.diffusion_model." + k: np.zeros_like(v) for k, v in compvis.items()}  # training weights
    ckpt.update({COMPVIS_EMA_PREFIX + k.replace(".", ""): v for k, v in compvis.items()})
    ckpt.update({"model_ema.decay": np.array(0.9999), "model_ema.num_updates": np.array(10)})
    ema = flatten(unet_params_from_compvis(ckpt, model, ema=True))
    want = flatten(unet_params_from_diffusers(ref.state_dict(), model))
    assert all(np.array_equal(ema[p], want[p]) for p in want)
    training = flatten(unet_params_from_compvis(ckpt, model))
    assert all(not np.array_equal(training[p], want[p]) for p in want)
    del ckpt[COMPVIS_EMA_PREFIX + "middle_block1qkvweight"]
    with pytest.raises(ConversionError, match="middle_block1qkvweight"):
        unet_params_from_compvis(ckpt, model, ema=True)


class _LegacyAttention(torch.nn.Module):
    """The CompVis AttentionBlock semantics, written out: per-head packed qkv, q and k each scaled by d**-1/4."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.GroupNorm(32, channels, eps=1e-5)
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        x = x.reshape(b, c, hgt * wid)
        qkv = self.qkv(self.norm(x))
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, hgt * wid).split(d, dim=1)
        s = d**-0.25
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, hgt * wid)
        return (x + self.proj_out(a)).reshape(b, c, hgt, wid)


@pytest.mark.parametrize("heads", [1, 4])
def test_legacy_qkv_split_matches_compvis_attention(heads):
    c = 64
    ref = _randomize(_LegacyAttention(c, heads), seed=heads)
    x = np.random.default_rng(heads).normal(size=(2, 4, 5, c)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    block = AttentionBlock(heads)
    target = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    params = convert_state_dict(split_compvis_qkv(sd, heads), target)
    got = block.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)
    # packing is the exact inverse of splitting
    for leaf in ("weight", "bias"):
        np.testing.assert_array_equal(pack_legacy_qkv(*split_legacy_qkv(sd[f"qkv.{leaf}"], heads), heads),
                                      sd[f"qkv.{leaf}"])


def test_conversion_is_strict():
    _, torch_kwargs, lidiff_kwargs, _ = CASES["cond_conv_proj"]
    ref = UNet2DConditionModel(**COMMON, **torch_kwargs)
    model = UNetModel(**lidiff_kwargs)
    sd = dict(ref.state_dict())
    missing = dict(sd)
    del missing["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(ConversionError, match="middle_block_1/transformer_blocks_0/attn2/to_k/kernel"):
        unet_params_from_diffusers(missing, model)
    with pytest.raises(ConversionError, match="add_embedding.linear_1.weight"):
        unet_params_from_diffusers({**sd, "add_embedding.linear_1.weight": sd["conv_in.weight"]}, model)
    with pytest.raises(ConversionError, match="num_res_blocks=2"):
        unet_params_from_diffusers(sd, UNetModel(**dict(lidiff_kwargs, num_res_blocks=2)))
    with pytest.raises(ConversionError, match="shape mismatch"):  # wrong context width
        unet_params_from_diffusers(sd, UNetModel(**dict(lidiff_kwargs, context_dim=32)))
    with pytest.raises(ConversionError, match="label_emb"):  # the model expects no class embedding
        unet_params_from_diffusers(sd, UNetModel(**dict(lidiff_kwargs, num_classes=None)))
