"""Conditioning encoders: output pytree keys and shapes per mode, null inputs, p_uncond substitution, and refusals
of inputs that do not fit the encoder (by name)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.models import conditioning as enc
from lidiff.models.layout import layout_tokens, none_token
from lidiff.models.text_transformer import TransformerEmbedder

B, D = 3, 16
NULL_TOKENS = (2, 3, 0, 0, 0, 0)  # [CLS] [SEP] [PAD]...


def transformer(vocab: int, length: int) -> TransformerEmbedder:
    return TransformerEmbedder(n_embed=D, n_layer=1, vocab_size=vocab, max_seq_len=length, heads=2, dim_head=8)


ENCODERS = {
    "class_crossattn": enc.ClassConditioning(num_classes=5, embed_dim=D),
    "class_adm": enc.ClassConditioning(num_classes=5, embed_dim=D, mode="adm"),
    "text": enc.TextConditioning(transformer(50, len(NULL_TOKENS)), NULL_TOKENS),
    "layout": enc.LayoutConditioning(transformer(1030, 6), num_classes=10, max_boxes=2, vocab_size=1030),
    "layout_hybrid": enc.LayoutConditioning(transformer(1030, 6), num_classes=10, max_boxes=2, vocab_size=1030,
                                            mode="hybrid"),
    "none": enc.Unconditional(),
}

INPUTS = {
    "class_crossattn": {"label": np.array([0, 4, 2], np.int32)},
    "class_adm": {"label": np.array([0, 4, 2], np.int32)},
    "text": {"tokens": np.array([[2, 7, 9, 3, 0, 0], [2, 11, 3, 0, 0, 0], [2, 3, 0, 0, 0, 0]], np.int32)},
    "layout": {"boxes": np.array([[[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.9, 0.9]], [[0.0, 0.2, 0.3, 0.4], [0, 0, 0, 0]],
                                  [[0.2, 0.2, 0.8, 0.8], [0, 0, 0, 0]]], np.float32),
               "box_labels": np.array([[1, 7], [3, -1], [9, -1]], np.int32)},
    "none": {},
}
INPUTS["layout_hybrid"] = INPUTS["layout"]
LATENT_HW = (8, 12)

EXPECTED = {"class_crossattn": {"context": (B, 1, D)}, "class_adm": {"y": (B,)}, "text": {"context": (B, 6, D)},
            "layout": {"context": (B, 6, D)}, "layout_hybrid": {"context": (B, 6, D), "concat": (B, 8, 12, 10)},
            "none": {}}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_output_keys_shapes_and_null_input(name):
    encoder, inputs = ENCODERS[name], INPUTS[name]
    params = encoder.init(jax.random.PRNGKey(0))
    cond = encoder.encode(params, inputs, latent_hw=LATENT_HW)
    assert encoder.concat_channels == (cond["concat"].shape[-1] if "concat" in cond else 0)
    assert {k: v.shape for k, v in cond.items()} == EXPECTED[name]
    null = encoder.null_inputs(B)
    enc.check_inputs(encoder, jax.device_get(null), B)  # the null input is itself a valid input
    null_cond = encoder.encode(params, null, latent_hw=LATENT_HW)
    for key in cond:  # the null input encodes to something else than a real input
        assert np.abs(np.asarray(null_cond[key], np.float32) - np.asarray(cond[key], np.float32)).max() > 0
        # and every row of the null input encodes alike
        np.testing.assert_allclose(np.asarray(null_cond[key])[1:], np.asarray(null_cond[key])[:-1])


def test_null_inputs_are_the_documented_ones():
    np.testing.assert_array_equal(ENCODERS["class_adm"].null_inputs(2)["label"], [5, 5])  # num_classes
    np.testing.assert_array_equal(ENCODERS["text"].null_inputs(2)["tokens"], [NULL_TOKENS] * 2)  # empty prompt
    layout = ENCODERS["layout"]
    null = layout.null_inputs(2)
    np.testing.assert_array_equal(null["box_labels"], -1)
    np.testing.assert_array_equal(layout.tokens(null), none_token(1030))  # no boxes: all "none" tokens
    np.testing.assert_array_equal(layout.tokens(INPUTS["layout"]),
                                  layout_tokens(INPUTS["layout"]["boxes"], INPUTS["layout"]["box_labels"],
                                                num_classes=10, vocab_size=1030))


def test_class_embedder_context_is_the_table_row():
    encoder = ENCODERS["class_crossattn"]
    params = encoder.init(jax.random.PRNGKey(1))
    table = np.asarray(params["embedding"]["embedding"])
    assert table.shape == (6, D)  # 5 classes + the null class
    context = np.asarray(encoder.encode(params, {"label": np.array([4, 5])})["context"])
    np.testing.assert_array_equal(context[:, 0], table[[4, 5]])


@pytest.mark.parametrize("name", ["class_adm", "text", "layout"])
def test_drop_to_null_replaces_exactly_the_dropped_rows(name):
    encoder, inputs = ENCODERS[name], INPUTS[name]
    drop = jnp.array([True, False, True])
    dropped = jax.device_get(enc.drop_to_null(encoder, inputs, drop))
    null = jax.device_get(encoder.null_inputs(B))
    for key in encoder.input_specs:
        np.testing.assert_array_equal(dropped[key][[0, 2]], null[key][[0, 2]])
        np.testing.assert_array_equal(dropped[key][1], inputs[key][1])
        assert dropped[key].dtype == inputs[key].dtype


@pytest.mark.parametrize("inputs, message", [
    ({}, "missing tokens"),
    ({"tokens": np.zeros((B, 6), np.int32), "label": np.zeros(B, np.int32)}, "unexpected label"),
    ({"tokens": np.zeros((B, 5), np.int32)}, "tokens has shape (3, 5), expected (3, 6)"),
    ({"tokens": np.zeros((B, 6), np.float32)}, "expected integers"),
])
def test_check_inputs_names_what_does_not_fit(inputs, message):
    with pytest.raises(ValueError, match="text conditioning inputs") as info:
        enc.check_inputs(ENCODERS["text"], inputs, B)
    assert message in str(info.value)


def test_unconditional_model_refuses_conditioning():
    with pytest.raises(ValueError, match="the model is unconditional"):
        enc.check_inputs(ENCODERS["none"], {"label": np.zeros(B, np.int32)}, B)


def test_class_mode_must_be_known():
    with pytest.raises(ValueError, match="'crossattn' or 'adm'"):
        enc.ClassConditioning(num_classes=5, embed_dim=D, mode="concat")


@pytest.mark.parametrize("method, n_stages", [("bilinear", 1), ("bilinear", 2), ("nearest", 2)])
def test_spatial_rescaler_matches_torch_interpolate_and_conv(method, n_stages):
    """CompVis's SpatialRescaler in PyTorch (interpolate(scale_factor=0.5), then a bias-free 1x1 conv) on the same
    map and weights."""
    import torch

    x = np.random.default_rng(0).normal(size=(2, 16, 12, 5)).astype(np.float32)
    rescaler = enc.SpatialRescaler(n_stages=n_stages, method=method, out_channels=3)
    params = rescaler.init(jax.random.PRNGKey(0), x)["params"]
    out = np.asarray(rescaler.apply({"params": params}, x))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for _ in range(n_stages):
        t = torch.nn.functional.interpolate(t, scale_factor=0.5, mode=method)
    weight = torch.from_numpy(np.array(params["channel_mapper"]["kernel"])).permute(3, 2, 0, 1)  # [out, in, 1, 1]
    t = torch.nn.functional.conv2d(t, weight)
    expected = t.permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 16 // 2 ** n_stages, 12 // 2 ** n_stages, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_spatial_rescaler_refuses_sizes_that_do_not_halve():
    with pytest.raises(ValueError, match="divisible by 4"):
        enc.SpatialRescaler(n_stages=2).init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 8, 3)))
