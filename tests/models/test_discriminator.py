"""PatchGAN discriminator: torch parity (train and eval BatchNorm), conversion, shapes, sharded BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from torch import nn as tnn

from lidiff.convert.common import ConversionError
from lidiff.convert.taming import discriminator_params_from_torch
from lidiff.models.discriminator import NLayerDiscriminator

NDF, N_LAYERS = 8, 3


def torch_nlayer(input_nc=3, ndf=NDF, n_layers=N_LAYERS):
    """The taming NLayerDiscriminator layout (BatchNorm), written from its definition with torch.nn layers."""
    seq = [tnn.Conv2d(input_nc, ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        seq += [tnn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), tnn.BatchNorm2d(ndf * mult),
                tnn.LeakyReLU(0.2)]
    seq += [tnn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    module = tnn.Module()
    module.main = tnn.Sequential(*seq)
    return module


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = torch_nlayer()
    with torch.no_grad():
        for m in ref.main:
            if isinstance(m, tnn.Conv2d):
                m.weight.normal_(0.0, 0.1)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = NLayerDiscriminator(ndf=NDF, n_layers=N_LAYERS)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    variables = discriminator_params_from_torch(sd, shapes)
    return ref, model, variables


def _images(seed, n=4, size=32):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_param_names_follow_taming_indices(reference):
    _, _, variables = reference
    assert sorted(variables["params"]) == ["main_0", "main_11", "main_2", "main_3", "main_5", "main_6", "main_8",
                                           "main_9"]
    assert sorted(variables["batch_stats"]) == ["main_3", "main_6", "main_9"]
    assert "bias" not in variables["params"]["main_2"] and "bias" in variables["params"]["main_0"]
    assert variables["params"]["main_8"]["kernel"].shape == (4, 4, 4 * NDF, 8 * NDF)


def test_train_mode_matches_torch_outputs_and_running_stats(reference):
    ref, model, variables = reference
    x = _images(1)
    ref_copy = torch_nlayer()
    ref_copy.load_state_dict(ref.state_dict())
    ref_copy.train()
    with torch.no_grad():
        want = ref_copy.main(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got, updates = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"]))(variables, x)
    assert got.shape == (4, 2, 2, 1) and got.dtype == jnp.float32
    assert _rel(got, want) < 1e-4
    # Running mean follows torch (momentum 0.1); torch's running_var uses the unbiased batch variance, flax's
    # the biased one: undo the n/(n-1) factor (n = B*H*W at that layer) to compare.
    for idx, hw in ((3, 8 * 8), (6, 4 * 4), (9, 3 * 3)):
        bn = ref_copy.main[idx]
        new = updates["batch_stats"][f"main_{idx}"]
        np.testing.assert_allclose(new["mean"], bn.running_mean.numpy(), atol=1e-5)
        n = 4 * hw
        old_var = variables["batch_stats"][f"main_{idx}"]["var"]
        batch_var_unbiased = (bn.running_var.numpy() - 0.9 * old_var) / 0.1
        expected_flax = 0.9 * old_var + 0.1 * batch_var_unbiased * (n - 1) / n
        np.testing.assert_allclose(new["var"], expected_flax, rtol=1e-4, atol=1e-5)


def test_eval_mode_uses_converted_running_stats(reference):
    ref, model, variables = reference
    x = _images(2)
    ref.eval()
    with torch.no_grad():
        want = ref.main(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
    assert _rel(got, want) < 1e-4
    # and the running stats really matter: batch statistics give a different answer
    got_train, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert _rel(got_train, want) > 1e-2


def test_conversion_is_strict_and_accepts_a_checkpoint_prefix(reference):
    ref, model, variables = reference
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    sd = {f"loss.discriminator.{k}": v for k, v in ref.state_dict().items()}
    sd["encoder.conv_in.weight"] = torch.zeros(1)  # outside the prefix: ignored
    out = discriminator_params_from_torch(sd, shapes, prefix="loss.discriminator.")
    np.testing.assert_array_equal(out["batch_stats"]["main_6"]["mean"], variables["batch_stats"]["main_6"]["mean"])
    bad = dict(ref.state_dict())
    del bad["main.9.running_var"]
    with pytest.raises(ConversionError, match="main_9/var"):
        discriminator_params_from_torch(bad, shapes)
    bad = dict(ref.state_dict())
    del bad["main.5.weight"]
    with pytest.raises(ConversionError, match="main_5/kernel"):
        discriminator_params_from_torch(bad, shapes)


@pytest.mark.parametrize("norm,n_layers,ndf,size,out", [
    ("batch", 3, 64, 256, 30),  # the reference setting: 30x30 patch logits
    ("none", 2, 8, 32, 6),
    ("group", 3, 32, 32, 2),
])
def test_shapes_init_and_norm_choices(norm, n_layers, ndf, size, out):
    model = NLayerDiscriminator(ndf=ndf, n_layers=n_layers, norm=norm)
    x = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (2, out, out, 1) and logits.dtype == jnp.float32
    assert ("batch_stats" in variables) == (norm == "batch")
    last_norm = f"main_{3 * n_layers}"
    assert (last_norm in variables["params"]) == (norm != "none")
    assert ("bias" in variables["params"]["main_2"]) == (norm == "none")


def test_init_distribution():
    model = NLayerDiscriminator(ndf=32, n_layers=3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    k = np.asarray(params["main_8"]["kernel"])
    assert abs(k.mean()) < 2e-3 and abs(k.std() - 0.02) < 1e-3
    s = np.asarray(params["main_9"]["scale"])
    assert abs(s.mean() - 1.0) < 5e-3 and 0.01 < s.std() < 0.03
    np.testing.assert_array_equal(params["main_9"]["bias"], 0.0)


def test_batchnorm_statistics_are_global_under_sharded_jit(reference):
    _, model, variables = reference
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py forces 8 host devices"
    mesh = Mesh(devices, ("data",))
    x = _images(3, n=8)  # one image per device: per-device statistics would differ a lot from global ones
    step = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"]))
    want, want_stats = step(variables, jnp.asarray(x))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape == (1, 32, 32, 3)
    got, got_stats = step(vs, xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # the check has teeth: statistics of a single image are far from those of the batch
    one, _ = step(variables, jnp.asarray(x[:1]))
    assert _rel(one, np.asarray(want)[:1]) > 1e-2
