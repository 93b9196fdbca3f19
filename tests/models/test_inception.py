"""The Flax FID Inception against a PyTorch model of the same graph (random weights), and pytorch-fid's resize."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from torch_inception_ref import random_fid_inception  # noqa: E402

from lidiff.convert.common import flatten  # noqa: E402
from lidiff.convert.inception_weights import inception_variables_from_state_dict, path_to_torch_key  # noqa: E402
from lidiff.models import inception  # noqa: E402


@pytest.fixture(scope="module")
def torch_model():
    return random_fid_inception(seed=0)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_variable_names_and_shapes_match_the_torch_state_dict_one_to_one(torch_model):
    torch_shapes = {
        k: tuple(v.shape) for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    flat = flatten(inception.inception_variable_shapes())
    flax_shapes = {path_to_torch_key(p): tuple(v.shape) for p, v in flat.items()}
    assert len(flax_shapes) == len(flat)  # no two paths share a key
    assert set(flax_shapes) == set(torch_shapes), (
        sorted(set(flax_shapes) - set(torch_shapes))[:5],
        sorted(set(torch_shapes) - set(flax_shapes))[:5],
    )
    for key, shape in torch_shapes.items():
        if key.endswith("conv.weight"):
            o, i, kh, kw = shape
            assert flax_shapes[key] == (kh, kw, i, o), key
        elif key == "fc.weight":
            assert flax_shapes[key] == shape[::-1]
        else:
            assert flax_shapes[key] == shape, key
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == inception.variable_count(
        inception.inception_variable_shapes()
    )


def test_features_match_the_torch_graph_on_random_weights(torch_model):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)  # odd sizes: exercises the resize too
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pool_t, logits_t = (t.numpy() for t in torch_model(x))
    variables = inception_variables_from_state_dict(torch_model.state_dict())
    out = jax.jit(inception.feature_fn)(variables, images)
    assert out["pool3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert np.std(pool_t) > 1e-2  # the random network keeps a non-trivial signal
    assert _rel(out["pool3"], pool_t) < 1e-4
    assert _rel(out["logits"], logits_t) < 1e-4
    fc = torch_model.fc.weight.detach().numpy()
    assert _rel(out["logits_unbiased"], pool_t @ fc.T) < 1e-4


@pytest.mark.parametrize("shape", [(8, 8), (32, 32), (37, 45), (320, 300), (299, 299)])
def test_resize_matches_torch_bilinear_align_corners_false(shape):
    x = np.random.default_rng(0).uniform(0.0, 1.0, (2, *shape, 3)).astype(np.float32)
    want = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    got = inception.resize_bilinear(jnp.asarray(x), (299, 299))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)


def test_resize_to_a_non_square_size_matches_torch():
    x = np.random.default_rng(2).uniform(0.0, 1.0, (1, 13, 20, 2)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(29, 7), mode="bilinear", align_corners=False)
    got = inception.resize_bilinear(jnp.asarray(x), (29, 7))
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_preprocess_maps_uint8_to_minus_one_one():
    images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1).repeat(3, axis=-1)
    x = np.asarray(inception.preprocess(jnp.asarray(images)))
    assert x.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(x[0], -1.0)
    np.testing.assert_allclose(x[1], 1.0)
