"""LPIPS: parity with a torch.nn reference through the .pth -> safetensors converter, invariants, refusals."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from lidiff.convert import lpips_weights
from lidiff.convert.common import ConversionError
from lidiff.models.lpips import LPIPS, LPIPS_CHANNELS, VGG16_CONV_INDICES, normalize_channels

TAP_AFTER = (3, 8, 15, 22, 29)  # torchvision features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
lpips_f32 = jax.jit(LPIPS().apply)  # one jitted function shared by the tests (compiles once per input shape)


class TorchVGGFeatures(tnn.Module):
    """torchvision's vgg16().features layout (same indices), built from torch.nn layers."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(tnn.MaxPool2d(2, 2))
            else:
                layers += [tnn.Conv2d(c, v, 3, padding=1), tnn.ReLU(inplace=False)]
                c = v
        self.features = tnn.Sequential(*layers)


class TorchLinHeads(tnn.Module):
    """LPIPS v0.1 heads with the released key layout ``lin{k}.model.1.weight``."""

    def __init__(self):
        super().__init__()
        for k, c in enumerate(LPIPS_CHANNELS):
            head = tnn.Module()
            head.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", head)


def torch_lpips(vgg, heads, x, y):
    """Reference LPIPS written from its definition. x, y: NCHW torch tensors in [-1, 1] -> [B]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(vgg.features):
            h = layer(h)
            if i in TAP_AFTER:
                out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        na = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
        nb = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
        d = getattr(heads, f"lin{k}").model((na - nb) ** 2)
        total = total + d.mean(dim=(2, 3))
    return total[:, 0]


@pytest.fixture(scope="module")
def torch_reference():
    torch.manual_seed(0)
    vgg, heads = TorchVGGFeatures().eval(), TorchLinHeads().eval()
    with torch.no_grad():
        for m in vgg.features:
            if isinstance(m, tnn.Conv2d):
                fan_in = m.weight.shape[1] * 9
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                m.bias.normal_(0.0, 0.1)
        for k in range(5):
            w = getattr(heads, f"lin{k}").model[1].weight
            w.copy_(torch.rand_like(w) * 0.2)  # the released heads are non-negative
    return vgg, heads


@pytest.fixture(scope="module")
def converted(torch_reference, tmp_path_factory):
    vgg, heads = torch_reference
    d = tmp_path_factory.mktemp("lpips")
    vgg_sd = dict(vgg.state_dict())
    vgg_sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier: ignored
    torch.save(vgg_sd, d / "vgg16-397923af.pth")
    torch.save(heads.state_dict(), d / "vgg.pth")
    out = d / "lpips_vgg16.safetensors"
    lpips_weights.main(["--vgg", str(d / "vgg16-397923af.pth"), "--lin", str(d / "vgg.pth"), "--out", str(out)])
    return out, lpips_weights.load_lpips_params(str(out))


def test_param_names_mirror_torchvision_indices(converted):
    _, params = converted
    assert sorted(params) == ["lin0", "lin1", "lin2", "lin3", "lin4", "vgg"]
    assert sorted(params["vgg"], key=lambda n: int(n.split("_")[1])) == [f"features_{i}" for i in VGG16_CONV_INDICES]
    assert params["vgg"]["features_28"]["kernel"].shape == (3, 3, 512, 512)
    assert params["lin2"]["kernel"].shape == (256, 1)


def test_lpips_matches_torch_reference(torch_reference, converted, size=32):
    vgg, heads = torch_reference
    _, params = converted
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    with torch.no_grad():
        want = torch_lpips(vgg, heads, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2))
    got = lpips_f32({"params": params}, jnp.asarray(x), jnp.asarray(y))
    want = want.numpy()
    assert got.shape == (2,) and got.dtype == jnp.float32
    assert np.all(want > 0)
    rel = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
    assert rel < 1e-4, (rel, got, want)


def test_lpips_of_identical_images_is_zero_and_grows_with_noise(converted):
    _, params = converted
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    f = lpips_f32
    same = np.asarray(f({"params": params}, x, x))
    # Under jit the two trunk branches may round differently (observed ~3e-16); distinct images give ~1e-2..1.
    assert np.all(np.abs(same) < 1e-9), same
    noise = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    small = f({"params": params}, x, x + 0.05 * noise)
    large = f({"params": params}, x, x + 0.5 * noise)
    assert np.all(np.asarray(small) > 0) and np.all(np.asarray(large) > np.asarray(small))


def test_lpips_bfloat16_compute_is_close_and_grads_flow_to_images(converted):
    _, params = converted
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    ref = lpips_f32({"params": params}, x, y)
    low = jax.jit(LPIPS(dtype=jnp.bfloat16).apply)({"params": params}, x, y)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(ref), rtol=5e-2)
    grad = jax.jit(jax.grad(lambda b: LPIPS().apply({"params": params}, x, b).sum()))(y)
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0


def test_normalize_channels_has_finite_gradient_at_zero_vectors():
    f = jnp.array([[[[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]]])  # [1, 1, 2, 3]; first position all zero
    np.testing.assert_allclose(np.asarray(normalize_channels(f))[0, 0, 1], [0.6, 0.8, 0.0], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(normalize_channels(f))[0, 0, 0], 0.0)
    g = jax.grad(lambda a: jnp.sum(normalize_channels(a) * jnp.arange(3.0)))(f)
    assert np.all(np.isfinite(np.asarray(g)))
    # Away from zero the gradient is the analytic one: d(f/|f|) . w = (w - (n.w) n) / |f|.
    n, w = np.array([0.6, 0.8, 0.0]), np.arange(3.0)
    np.testing.assert_allclose(np.asarray(g)[0, 0, 1], (w - n.dot(w) * n) / 5.0, atol=1e-5)


def test_missing_file_message_names_path_command_and_sources(tmp_path):
    path = str(tmp_path / "nowhere" / "lpips.safetensors")
    with pytest.raises(FileNotFoundError) as err:
        lpips_weights.load_lpips_params(path)
    msg = str(err.value)
    assert path in msg
    assert f"python -m lidiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth --out {path}" in msg
    assert "vgg16-397923af.pth" in msg and "PerceptualSimilarity" in msg and "taming" in msg


def test_loader_names_a_wrongly_shaped_or_missing_tensor(converted, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = converted
    tensors = load_file(str(path))
    bad = dict(tensors)
    bad["lin3/kernel"] = np.zeros((7, 1), np.float32)
    del bad["vgg/features_10/bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as err:
        lpips_weights.load_lpips_params(str(tmp_path / "bad.safetensors"))
    assert "lin3/kernel" in str(err.value) and "vgg/features_10/bias" in str(err.value)


def test_converter_rejects_unknown_and_missing_source_keys(torch_reference):
    vgg, heads = torch_reference
    lin_sd = dict(heads.state_dict())
    lin_sd["lin5.model.1.weight"] = torch.zeros(1, 8, 1, 1)
    with pytest.raises(ConversionError, match="lin5.model.1.weight"):
        lpips_weights.lpips_params_from_state_dicts(vgg.state_dict(), lin_sd)
    vgg_sd = {k: v for k, v in vgg.state_dict().items() if k != "features.12.weight"}
    with pytest.raises(ConversionError, match="features_12/kernel"):
        lpips_weights.lpips_params_from_state_dicts(vgg_sd, heads.state_dict())


def test_converter_without_torch_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(SystemExit, match=r"pip install torch==2\.13\.0"):
        lpips_weights.main(["--vgg", "a.pth", "--lin", "b.pth", "--out", str(tmp_path / "o.safetensors")])


def test_distance_from_precomputed_features_equals_lpips(converted):
    """LPIPS(x, y) == distance(features(x), y), features(x) computed once and reused for several y."""
    _, params = converted
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    feats = jax.jit(lambda p, a: LPIPS().apply({"params": p}, a, method=LPIPS.features))(params, x)
    assert [f.shape for f in feats] == [(2, 32 >> k, 32 >> k, c) for k, c in enumerate(LPIPS_CHANNELS)]
    assert all(f.dtype == jnp.float32 for f in feats)
    for f in feats:  # unit-normalised along channels wherever a position is not all zero
        norms = np.linalg.norm(np.asarray(f), axis=-1)
        np.testing.assert_allclose(norms[norms > 0], 1.0, atol=1e-5)
    distance = jax.jit(lambda p, fx, b: LPIPS().apply({"params": p}, fx, b, method=LPIPS.distance))
    for scale in (0.05, 0.5):
        y = jnp.clip(x + scale * jnp.asarray(rng.normal(size=x.shape), jnp.float32), -1, 1)
        want = np.asarray(lpips_f32({"params": params}, x, y))
        got = np.asarray(distance(params, feats, y))
        assert np.all(want > 0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Gradients to y agree too (what the perceptual loss uses).
    g_want = jax.grad(lambda b: LPIPS().apply({"params": params}, x, b).sum())(y)
    g_got = jax.grad(lambda b: LPIPS().apply({"params": params}, feats, b, method=LPIPS.distance).sum())(y)
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="features of x"):
        LPIPS().apply({"params": params}, feats, y[:, :16, :16], method=LPIPS.distance)
