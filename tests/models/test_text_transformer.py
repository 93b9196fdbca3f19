"""TransformerEmbedder: parity with a PyTorch x-transformers-shaped encoder, converter strictness, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from lidiff.convert import compvis_cond
from lidiff.convert.common import ConversionError
from lidiff.models.conditioning import ClassEmbedder
from lidiff.models.text_transformer import FeedForward, TransformerEmbedder

PREFIX = "cond_stage_model.transformer."


# --------------------------------------------------------------------------------- PyTorch reference (CompVis)
# Module names follow CompVis's vendored x-transformers so that state_dict() has the checkpoint's keys.


class TorchAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * self.scale, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class TorchFeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TorchPosEmb(nn.Module):
    def __init__(self, dim, max_seq_len):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x):
        return self.emb(torch.arange(x.shape[1]))[None]


class TorchEncoder(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), TorchAttention(dim), nn.Identity()]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), TorchFeedForward(dim), nn.Identity()]))

    def forward(self, x):
        for norm, block, _ in self.layers:
            x = block(norm(x)) + x
        return x


class TorchTransformerWrapper(nn.Module):
    def __init__(self, num_tokens, max_seq_len, dim, depth):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = TorchPosEmb(dim, max_seq_len)
        self.attn_layers = TorchEncoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens):  # return_embeddings=True
        x = self.token_emb(tokens)
        x = x + self.pos_emb(x)
        return self.norm(self.attn_layers(x))


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # non-trivial LayerNorm affine params too
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 2 else 0.5) + (1.0 if p.ndim == 1 else 0))
    return module


DIM, DEPTH, VOCAB, MAXLEN = 96, 2, 50, 12


def _torch_state_dict(seed=0):
    ref = _randomise(TorchTransformerWrapper(VOCAB, MAXLEN, DIM, DEPTH), seed).eval()
    return ref, {PREFIX + k: v for k, v in ref.state_dict().items()}


def _model(**kw):
    return TransformerEmbedder(n_embed=DIM, n_layer=DEPTH, vocab_size=VOCAB, max_seq_len=MAXLEN, **kw)


def _target(model, length=MAXLEN):
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def test_state_dict_keys_are_the_compvis_keys():
    _, sd = _torch_state_dict()
    assert PREFIX + "attn_layers.layers.1.1.net.0.0.weight" in sd and PREFIX + "pos_emb.emb.weight" in sd
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _target(_model()))
    exported = compvis_cond.text_transformer_to_compvis(zeros)
    assert set(exported) == set(sd) - {PREFIX + "to_logits.weight", PREFIX + "to_logits.bias"}


@pytest.mark.parametrize("kernel", ["xla", "reference"])
def test_forward_matches_pytorch_encoder(kernel):
    ref, sd = _torch_state_dict()
    model = _model(attention_kernel=kernel)
    params = compvis_cond.text_transformer_params_from_compvis(sd, _target(model))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, MAXLEN))
    tokens[1, 5:] = 0  # padding is attended to (no mask), like CompVis
    with torch.no_grad():
        want = ref(torch.from_numpy(tokens)).numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    assert got.shape == (3, MAXLEN, DIM) and got.dtype == np.float32
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel
    # A sequence shorter than max_seq_len uses the first positions only.
    with torch.no_grad():
        want_short = ref(torch.from_numpy(tokens[:, :7])).numpy()
    got_short = np.asarray(model.apply({"params": params}, jnp.asarray(tokens[:, :7], jnp.int32)))
    assert np.linalg.norm(got_short - want_short) / np.linalg.norm(want_short) < 1e-4


def test_feed_forward_block_matches_torch_exact_gelu():
    ref, sd = _torch_state_dict()
    params = compvis_cond.text_transformer_params_from_compvis(sd, _target(_model()))
    x = np.random.default_rng(2).standard_normal((2, 5, DIM)).astype(np.float32) * 3.0
    with torch.no_grad():
        want = ref.attn_layers.layers[1][1](torch.from_numpy(x)).numpy()
    block = FeedForward(DIM)
    got = block.apply({"params": params["attn_layers"]["layers_1_1"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())  # tanh-GELU fails this


def test_bfloat16_compute_stays_close():
    _, sd = _torch_state_dict()
    params = compvis_cond.text_transformer_params_from_compvis(sd, _target(_model()))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, MAXLEN)), jnp.int32)
    full = _model().apply({"params": params}, tokens)
    half = _model(dtype=jnp.bfloat16).apply({"params": params}, tokens)
    assert half.dtype == jnp.bfloat16
    assert float(jnp.linalg.norm(half.astype(jnp.float32) - full) / jnp.linalg.norm(full)) < 0.05
    with pytest.raises(ValueError, match="max_seq_len"):
        _model().apply({"params": params}, jnp.zeros((1, MAXLEN + 1), jnp.int32))


def test_converter_round_trips_compvis_keys_bit_exactly():
    _, sd = _torch_state_dict(seed=3)
    params = compvis_cond.text_transformer_params_from_compvis(sd, _target(_model()))
    back = compvis_cond.text_transformer_to_compvis(params)
    assert set(back) == set(sd) - {PREFIX + "to_logits.weight", PREFIX + "to_logits.bias"}
    for key, value in back.items():
        np.testing.assert_array_equal(value, sd[key].numpy(), err_msg=key)
    again = compvis_cond.text_transformer_params_from_compvis(back, _target(_model()))
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_converter_ignores_to_logits_and_keys_outside_the_prefix():
    _, sd = _torch_state_dict()
    sd["model.diffusion_model.out.0.weight"] = torch.zeros(3)  # another part of a whole checkpoint
    without_head = {k: v for k, v in sd.items() if "to_logits" not in k}
    a = compvis_cond.text_transformer_params_from_compvis(sd, _target(_model()))
    b = compvis_cond.text_transformer_params_from_compvis(without_head, _target(_model()))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert "to_logits" in compvis_cond.IGNORED_TRANSFORMER_KEYS[0]


def test_converter_refuses_missing_extra_and_misshapen_keys():
    _, sd = _torch_state_dict()
    target = _target(_model())
    missing = dict(sd)
    del missing[PREFIX + "attn_layers.layers.2.1.to_k.weight"]
    with pytest.raises(ConversionError, match=r"missing \(1\): attn_layers/layers_2_1/to_k/kernel"):
        compvis_cond.text_transformer_params_from_compvis(missing, target)
    extra = dict(sd, **{PREFIX + "attn_layers.layers.9.1.to_q.weight": torch.zeros(512, DIM)})
    with pytest.raises(ConversionError, match=r"unexpected \(1\): attn_layers\.layers\.9\.1\.to_q\.weight"):
        compvis_cond.text_transformer_params_from_compvis(extra, target)
    wrong = dict(sd, **{PREFIX + "norm.weight": torch.ones(DIM + 1)})
    with pytest.raises(ConversionError, match=r"shape mismatch \(1\): norm\.weight \(97,\)"):
        compvis_cond.text_transformer_params_from_compvis(wrong, target)
    with pytest.raises(ConversionError, match="no keys start with 'cond_stage_model.transformer.'"):
        compvis_cond.text_transformer_params_from_compvis({"x.weight": torch.zeros(1)}, target)


def test_class_embedder_key_round_trip():
    table = np.random.default_rng(0).standard_normal((11, 16)).astype(np.float32)
    sd = {"cond_stage_model.embedding.weight": torch.from_numpy(table), "model.diffusion_model.x.bias": torch.ones(2)}
    model = ClassEmbedder(embed_dim=16, n_classes=11)
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
    params = compvis_cond.class_embedder_params_from_compvis(sd, target)
    np.testing.assert_array_equal(params["embedding"]["embedding"], table)
    out = model.apply({"params": params}, jnp.array([3, 10]))
    np.testing.assert_array_equal(np.asarray(out)[:, 0], table[[3, 10]])
    back = compvis_cond.class_embedder_to_compvis(params)
    assert list(back) == ["cond_stage_model.embedding.weight"]
    np.testing.assert_array_equal(back["cond_stage_model.embedding.weight"], table)
    with pytest.raises(ConversionError, match=r"shape mismatch.*embedding\.weight \(11, 16\)"):
        bigger = jax.eval_shape(ClassEmbedder(16, 12).init, jax.random.key(0), jnp.zeros((1,), jnp.int32))
        compvis_cond.class_embedder_params_from_compvis(sd, bigger["params"])


def test_txt2img_1p4b_parameter_count():
    model = TransformerEmbedder(n_embed=1280, n_layer=32, vocab_size=30522, max_seq_len=77)
    target = _target(model, length=77)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    to_logits = 1280 * 30522 + 30522
    per_block = 3 * 1280 * 512 + 512 * 1280 + 1280 + 2 * 1280 * 5120 + 5120 + 1280 + 4 * 1280
    assert n == 30522 * 1280 + 77 * 1280 + 32 * per_block + 2 * 1280
    assert 38e6 < to_logits < 40e6
    assert 575e6 < n + to_logits < 590e6  # the paper's / reference's ~582M with the unused head
