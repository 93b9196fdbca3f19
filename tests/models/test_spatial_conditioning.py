"""Spatial conditioning encoders (super-resolution, inpainting, semantic maps): what each concatenates to x_t, the
latent size an input implies (and the refusal of one that does not fit), null inputs, the paste-back of known
pixels, and the UNet channel check that names the right ``in_channels``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from lidiff.errors import ConfigError
from lidiff.models import spatial_conditioning as spatial
from lidiff.models.autoencoder import DiagonalGaussian
from lidiff.train.conditioning import check_unet_channels

B = 2


class ToyFirstStage:
    """A stand-in first stage of factor 4: the posterior mean is params["w"] times the 4x4 block average of the
    first two channels (a KL posterior with a log-variance, so ``mode()`` must pick the mean)."""

    downsample_factor = 4
    latent_channels = 2

    def encode(self, params, x):
        b, h, w, _ = x.shape
        mean = x[..., :2].reshape(b, h // 4, 4, w // 4, 4, 2).mean(axis=(2, 4)) * params["w"]
        return DiagonalGaussian.from_mean_logvar(mean, jnp.full(mean.shape, 0.5))


def test_superres_identity_when_latent_sized_else_bicubic_to_the_latent():
    rng = np.random.default_rng(0)
    low = rng.uniform(-1, 1, (B, 8, 12, 3)).astype(np.float32)
    x4_f4 = spatial.SuperResolutionConditioning(factor=4, latent_factor=4)  # LDM-SR: the low-res is latent-sized
    assert x4_f4.latent_hw({"lowres": low}) == (8, 12) and x4_f4.concat_channels == 3
    np.testing.assert_array_equal(x4_f4.encode({}, {"lowres": low})["concat"], low)
    x8_f4 = spatial.SuperResolutionConditioning(factor=8, latent_factor=4)  # latents twice the low-res size
    assert x8_f4.latent_hw({"lowres": low}) == (16, 24)
    out = np.asarray(x8_f4.encode({}, {"lowres": low}, latent_hw=(16, 24))["concat"])
    np.testing.assert_allclose(out, jax.image.resize(low, (B, 16, 24, 3), "bicubic"), atol=1e-6)
    x2_f4 = spatial.SuperResolutionConditioning(factor=2, latent_factor=4)  # low-res 2x the latent: sides even
    with pytest.raises(ValueError, match=r"lowres is 7x12: its sides must be multiples of 2"):
        x2_f4.latent_hw({"lowres": np.zeros((1, 7, 12, 3), np.float32)})
    np.testing.assert_array_equal(x4_f4.null_inputs(3, (5, 6))["lowres"], np.zeros((3, 5, 6, 3)))


def test_inpainting_concat_is_the_encoded_masked_image_and_the_mask_in_minus_one_one():
    encoder = spatial.InpaintingConditioning(ToyFirstStage())
    assert encoder.concat_channels == 3
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (B, 16, 8, 3)).astype(np.float32)
    mask = np.zeros((B, 16, 8, 1), np.float32)
    mask[0, :8, :4] = 1.0  # exactly latent cells (0..1, 0) of image 0
    mask[1, 1, 1] = 1.0  # not a block's top-left pixel: PyTorch's nearest (CompVis) does not see it ...
    mask[1, 4, 4] = 1.0  # ... but sees this one, the top-left pixel of latent cell (1, 1)
    masked = np.where(mask > 0, -1.0, image).astype(np.float32)
    inputs = {"masked_image": masked, "mask": mask}
    assert encoder.latent_hw(inputs) == (4, 2)
    params = {"w": 2.0}
    concat = np.asarray(encoder.encode({}, inputs, first_stage_params=params)["concat"])
    assert concat.shape == (B, 4, 2, 3)
    want_z = 2.0 * masked[..., :2].reshape(B, 4, 4, 2, 4, 2).mean(axis=(2, 4))  # the mode, unscaled
    np.testing.assert_allclose(concat[..., :2], want_z, atol=1e-6)
    want_mask = -np.ones((B, 4, 2), np.float32)
    want_mask[0, :2, 0] = 1.0
    want_mask[1, 1, 1] = 1.0
    np.testing.assert_array_equal(concat[..., 2], want_mask)
    with pytest.raises(ValueError, match="pass first_stage_params"):
        encoder.encode({}, inputs)
    with pytest.raises(ValueError, match=r"mask is 16x4 but the image is 16x8"):
        encoder.latent_hw({"masked_image": masked, "mask": mask[:, :, :4]})
    null = encoder.null_inputs(1, (4, 2))
    assert (np.asarray(null["mask"]) == 1).all() and (np.asarray(null["masked_image"]) == -1).all()


def test_keep_known_pastes_the_known_pixels_back_exactly():
    rng = np.random.default_rng(2)
    given = rng.uniform(-1, 1, (B, 8, 8, 3)).astype(np.float32)
    mask = (rng.uniform(size=(B, 8, 8, 1)) < 0.5).astype(np.float32)
    sample = rng.uniform(-1, 1, (B, 8, 8, 3)).astype(np.float32)
    out = np.asarray(spatial.InpaintingConditioning.keep_known(sample, {"masked_image": given, "mask": mask}))
    known = np.broadcast_to(mask == 0, out.shape)
    np.testing.assert_array_equal(out[known], given[known])
    np.testing.assert_array_equal(out[~known], sample[~known])


def test_semantic_one_hot_through_the_rescaler():
    seg = np.random.default_rng(3).integers(0, 5, (B, 8, 16)).astype(np.int32)
    plain = spatial.SemanticConditioning(num_classes=5, latent_factor=4)
    assert plain.init(jax.random.PRNGKey(0)) == {} and plain.concat_channels == 5
    assert plain.latent_hw({"segmentation": seg}) == (2, 4)
    concat = np.asarray(plain.encode({}, {"segmentation": seg})["concat"])
    one_hot = np.eye(5, dtype=np.float32)[seg]
    np.testing.assert_allclose(concat, one_hot.reshape(B, 2, 4, 4, 4, 5).mean(axis=(2, 4)), atol=1e-6)
    mapped = spatial.SemanticConditioning(num_classes=5, latent_factor=4, map_channels=3)
    params = mapped.init(jax.random.PRNGKey(0))
    kernel = np.asarray(params["channel_mapper"]["kernel"])
    assert kernel.shape == (1, 1, 5, 3) and mapped.concat_channels == 3
    out = np.asarray(mapped.encode(params, {"segmentation": seg})["concat"])
    np.testing.assert_allclose(out, concat @ kernel[0, 0], atol=1e-5)
    with pytest.raises(ValueError, match=r"segmentation is 10x16: its sides must be multiples of 4"):
        plain.latent_hw({"segmentation": np.zeros((1, 10, 16), np.int32)})
    with pytest.raises(ValueError, match="power-of-2"):
        spatial.SemanticConditioning(num_classes=5, latent_factor=6)


def test_unet_channels_checked_with_the_number_that_fits():
    model = ConfigDict({"in_channels": 3, "out_channels": 3})
    encoder = spatial.InpaintingConditioning(ToyFirstStage())
    with pytest.raises(ConfigError, match=r"in_channels=3, but the UNet's input is 2 latent channels \+ 3 "
                                          r"concatenated conditioning channels .*set in_channels=5"):
        check_unet_channels(model, 2, encoder)
    model.in_channels = 5
    with pytest.raises(ConfigError, match="out_channels=3, .* set out_channels=2"):
        check_unet_channels(model, 2, encoder)
    model.out_channels = 2
    check_unet_channels(model, 2, encoder)
