"""InceptionV3 as used for FID: the 2015-12-05 TensorFlow graph as ported by pytorch-fid, in Flax (NHWC).

This is torchvision's ``Inception3`` layout (1008 classes, no aux head) with pytorch-fid's patches, which make it
compute what the TensorFlow FID graph computes:

- ``InceptionA``/``InceptionC``/``InceptionE_1`` (``Mixed_5b-d``, ``Mixed_6b-e``, ``Mixed_7b``): the pooling branch
  averages a 3x3 window *without* the zero padding (``count_include_pad=False``);
- ``InceptionE_2`` (``Mixed_7c``): the pooling branch is a 3x3 *max* pool (stride 1, padding 1);
- every conv is ``BasicConv`` = conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU.

Parameter names follow the PyTorch state dict (``Mixed_6b/branch7x7_2/conv/kernel``), so the weight converter in
``lidiff.convert.inception_weights`` maps keys one to one. Variables are ``{"params": ..., "batch_stats": ...}``;
batch norm always uses the stored statistics.

Inputs and preprocessing (``preprocess``): uint8 images -> float in [0, 1] -> bilinear resize to 299x299 exactly as
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing) -> ``2 x - 1``.
Outputs (``InceptionV3.__call__``): ``pool3`` [B, 2048] (spatial mean of ``Mixed_7c``), ``logits`` [B, 1008]
(``fc`` with bias) and ``logits_unbiased`` [B, 1008] (``pool3 @ fc.kernel``, what the original Inception Score
code and torch-fidelity use).

Pure module: no files, no logging. Weights are loaded elsewhere (``lidiff.convert.inception_weights``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
RESIZE = "bilinear 299x299, torch F.interpolate(align_corners=False, antialias=False), pytorch-fid"


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear (align_corners=False) along one axis, in float32 like torch.

    Returns (i0 [out] int32, i1 [out] int32, w1 [out] float32); output j = (1 - w1) x[i0] + w1 x[i1].
    """
    scale = np.float32(in_size) / np.float32(out_size)
    # torch: scale * (j + 0.5) - 0.5 in float32 with a fused multiply-add (one rounding), which the float64
    # product of two float32 numbers reproduces exactly.
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize matching ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialias).

    x: [B, H, W, C] float -> [B, size[0], size[1], C], same dtype. Interpolates along W, then along H, as torch's
    CPU kernel does.
    """
    _, h, w, _ = x.shape
    if (h, w) == tuple(size):
        return x
    i0, i1, w1 = _bilinear_taps(w, size[1])
    w1 = jnp.asarray(w1, x.dtype)[None, None, :, None]
    x = jnp.take(x, i0, axis=2) * (1 - w1) + jnp.take(x, i1, axis=2) * w1
    i0, i1, w1 = _bilinear_taps(h, size[0])
    w1 = jnp.asarray(w1, x.dtype)[None, :, None, None]
    return jnp.take(x, i0, axis=1) * (1 - w1) + jnp.take(x, i1, axis=1) * w1


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] in 0..255 -> float32 [B, 299, 299, 3] in [-1, 1] (pytorch-fid's resize, then 2x - 1)."""
    x = images.astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


class BasicConv(nn.Module):
    """conv (no bias) -> batch norm (running stats, eps 1e-3) -> ReLU.  [B, H, W, I] -> [B, H', W', features]."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            kernel_init=nn.initializers.he_normal(),
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_no_pad(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, padded zeros not counted (TensorFlow's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: [B, H, W, I] -> [B, H, W, 224 + pool_features]."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(64, (5, 5), (2, 2), name="branch5x5_2")(c(48, (1, 1), name="branch5x5_1")(x))
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_3")(c(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3))
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: [B, 35, 35, 288] -> [B, 17, 17, 768]."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = BasicConv(384, (3, 3), strides=2, precision=p, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), precision=p, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), precision=p, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, precision=p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: [B, 17, 17, 768] -> [B, 17, 17, 768]; factorised 7x7 convs with ``channels_7x7`` channels."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, *row, name="branch7x7_2")(b7)
        b7 = c(192, *col, name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, *col, name="branch7x7dbl_2")(bd)
        bd = c(c7, *row, name="branch7x7dbl_3")(bd)
        bd = c(c7, *col, name="branch7x7dbl_4")(bd)
        bd = c(192, *row, name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_no_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: [B, 17, 17, 768] -> [B, 8, 8, 1280]."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=(0, 0), s=1, name=None: BasicConv(f, k, s, p, self.precision, name=name)
        b3 = c(320, (3, 3), s=2, name="branch3x3_2")(c(192, (1, 1), name="branch3x3_1")(x))
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), (0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), (3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), s=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``: average pool without padding) and Mixed_7c (``max_pool=True``).

    [B, 8, 8, I] -> [B, 8, 8, 2048].
    """

    max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [c(384, (1, 3), (0, 1), name="branch3x3_2a")(b3), c(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], -1
        )
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [c(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd), c(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)],
            -1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_no_pad(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3.

    __call__(x): x float32 [B, 299, 299, 3] in [-1, 1] (see ``preprocess``) ->
    ``{"pool3": [B, 2048], "logits": [B, 1008], "logits_unbiased": [B, 1008]}``, float32.
    ``precision`` is the conv/matmul precision (HIGHEST by default: no TF32/bf16 passes on accelerators).
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        p = self.precision
        x = BasicConv(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, p, name=name)(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(False, p, name="Mixed_7b")(x)
        x = InceptionE(True, p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
        fc = nn.Dense(NUM_LOGITS, precision=p, name="fc")
        logits = fc(pool3)
        logits_unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=p)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased}


def inception_variable_shapes() -> dict:
    """``{"params": ..., "batch_stats": ...}`` of ``jax.ShapeDtypeStruct`` (no computation)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))


def random_inception_variables(seed: int = 0) -> dict:
    """Random variables for tests and benchmarks: He-normal kernels, unit scale, zero bias, unit batch statistics.

    Drawn with numpy from ``seed`` (jitting ``init`` of 24M parameters on CPU is far slower). Their features are NOT
    those of the FID network; results computed with them only test plumbing.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        return np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, inception_variable_shapes())


def feature_fn(variables: Any, images: jax.Array, precision: Any = jax.lax.Precision.HIGHEST) -> dict[str, jax.Array]:
    """uint8 [B, H, W, 3] images -> ``InceptionV3`` outputs (pool3 [B, 2048], logits [B, 1008], ...)."""
    return InceptionV3(precision).apply(variables, preprocess(images))


def variable_count(variables: Any) -> int:
    """Number of scalars in a variables tree."""
    return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(variables)))


__all__: Sequence[str] = (
    "InceptionV3",
    "preprocess",
    "resize_bilinear",
    "inception_variable_shapes",
    "random_inception_variables",
    "feature_fn",
    "RESIZE",
)
