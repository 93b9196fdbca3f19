"""Stage 2 with spatial conditioning, end to end: super-resolution, inpainting and semantic synthesis.

Each task trains once (``train_diffusion``, 2 steps, global batch 8 over the 8 forced CPU devices) from a random
KL first stage (32x32 RGB -> 8x8x2 latents, f4) with a two-level 32-channel UNet (latent sides must be even)
whose input is the latent plus 3 concatenated channels: the x4 low-res image (8x8, latent-sized), the encoded
masked image + the mask, or the segmentation map through a ``SpatialRescaler`` to 3 channels. The low-res
images and masks are made from the training images inside the step; the maps come from
``digits_segmentation``. Then, from each run directory:

- samples are finite and shaped like the image the input implies; with the zero-initialised kernels randomised,
  rows whose conditioning differs differ and rows whose conditioning and noise agree are equal;
- an input twice as large gives an image twice as large (the UNet runs convolutionally), also in 8x8 latent
  tiles (super-resolution); tiled sampling equals untiled when the latents fit in one tile;
- inpainting keeps the known pixels exactly;
- ``sample.py`` with ``--cond_image``/``--mask``/``--segmentation`` records the conditioning, and refuses a mask of
  the wrong size, a class id beyond ``num_classes`` and a low-res size the UNet cannot halve;
- the config refusals (``in_channels`` that does not add up, the latent cache for derived inputs).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base
from lidiff.errors import ConfigError
from lidiff.runs import load_latent_diffusion
from lidiff.train.diffusion import train_diffusion
from stage2_support import randomized_kernels, train_recorded, write_random_first_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES, BATCH, LATENT_CH, CONCAT = 32, 8, 2, 3
SEG_CLASSES = 11
NUM_STEPS, SAMPLE_STEPS = 2, 2


def stage2_config(kind: str, fs_workdir: str = ""):
    model = base.autoencoder_model("kl", ch_mult=(1, 1, 1), z_channels=LATENT_CH, embed_dim=LATENT_CH, ch=32,
                                   num_res_blocks=1, resolution=RES)
    loss = base.autoencoder_loss(perceptual_weight=0.0, disc_num_layers=1, disc_ndf=8)
    ae = base.autoencoder_stage(model, loss, batch_size=BATCH, learning_rate=1e-3)
    # every task concatenates 3 channels (inpainting: the 2 latent channels of the masked image + the mask)
    unet = base.unet_model(in_channels=LATENT_CH + CONCAT,
                           out_channels=LATENT_CH, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                           attention_resolutions=(), num_heads=2, num_head_channels=-1, legacy=False,
                           use_scale_shift_norm=True)
    d = base.diffusion_stage(unet, batch_size=BATCH, learning_rate=1e-3)
    d.conditioning = base.conditioning(kind, mode="concat", sr_factor=4, num_classes=SEG_CLASSES,
                                       map_channels=CONCAT)
    d.first_stage.workdir = fs_workdir
    d.first_stage.scale_by_std = True
    d.train.update(dict(num_steps=NUM_STEPS, log_every=1, sample_every=0, checkpoint_every=NUM_STEPS))
    d.sample.update(dict(steps=SAMPLE_STEPS, num_images=4, final_samples_per_class=1))
    if kind == "semantic":
        data = base.data_config("digits_segmentation", resolution=RES, num_threads=0)
        d.sample.cond_data = base.data_config("digits_segmentation", resolution=RES, split="held_out")
    else:
        data = base.data_config("synthetic", resolution=RES, num_examples=16, num_threads=0)
    return base.experiment(("diffusion",), data, ae, d, seed=0)


@pytest.fixture(scope="module")
def fs_workdir(tmp_path_factory):
    return write_random_first_stage(str(tmp_path_factory.mktemp("stage1")), stage2_config("superres"), RES)


@pytest.fixture(scope="module", params=["superres", "inpainting", "semantic"])
def run(request, fs_workdir, tmp_path_factory):
    kind = request.param
    workdir = str(tmp_path_factory.mktemp(kind) / "run")
    result = train_recorded(kind, stage2_config(kind, fs_workdir), workdir)
    result.model = load_latent_diffusion(workdir)
    return result


def conditionings(kind: str, size: int, seed: int = 0) -> dict:
    """Two distinct raw inputs (rows 0 and 1) for images of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    if kind == "superres":
        return {"lowres": rng.uniform(-1, 1, (2, size // 4, size // 4, 3)).astype(np.float32)}
    if kind == "inpainting":
        mask = np.zeros((2, size, size, 1), np.float32)
        mask[0, : size // 2] = 1.0
        mask[1, :, size // 2:] = 1.0
        image = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
        return {"masked_image": np.where(mask > 0, -1.0, image).astype(np.float32), "mask": mask}
    seg = np.zeros((2, size, size), np.int32)
    seg[0, 4:size // 2, 4:size // 2] = 4
    seg[1, size // 2:, :] = 9
    return {"segmentation": seg}


def rows(inputs: dict, index) -> dict:
    return {k: np.asarray(v)[np.asarray(index)] for k, v in inputs.items()}


def generate(model, params, inputs, size: int, **kwargs):
    return model.ldm.generate(params, model.first_stage_params, model.scale_factor, jax.random.PRNGKey(3),
                              num=len(next(iter(inputs.values()))), latent_shape=(size // 4, size // 4, LATENT_CH),
                              inputs=inputs, sampler="ddim", steps=SAMPLE_STEPS, **kwargs)


def test_trains_and_samples_at_the_size_the_input_implies(run):
    model = run.model
    assert int(run.state.step) == NUM_STEPS and model.ldm.conditioner.kind == run.kind
    assert model.params["unet"]["input_blocks_0_0"]["kernel"].shape[2] == LATENT_CH + model.ldm.conditioner.concat_channels
    pair = conditionings(run.kind, RES)
    mixed, same = rows(pair, [0, 1, 0, 1]), rows(pair, [0, 0, 0, 0])
    assert model.ldm.latent_hw(mixed) == (RES // 4, RES // 4)
    params = randomized_kernels(model.params)  # the trained params' samples: test_final_samples_record_...
    x_mixed, x_same = generate(model, params, mixed, RES), generate(model, params, same, RES)
    assert x_mixed.shape == (4, RES, RES, 3) and np.isfinite(x_mixed).all()
    np.testing.assert_allclose(x_mixed[0::2], x_same[0::2], atol=1e-5)
    assert np.abs(x_mixed[1::2] - x_same[1::2]).reshape(2, -1).max(axis=1).min() > 1e-3

    # twice the input, twice the image: the UNet runs convolutionally on 16x16 latents
    big = conditionings(run.kind, 2 * RES, seed=1)
    assert model.ldm.latent_hw(big) == (RES // 2, RES // 2)
    large = generate(model, params, big, 2 * RES)
    assert large.shape == (2, 2 * RES, 2 * RES, 3) and np.isfinite(large).all()
    with pytest.raises(ValueError, match="latent_shape is"):  # a latent_shape that disagrees with the input
        generate(model, params, big, RES)
    if run.kind == "superres":  # given starting noise (the same code path for every kind): DDIM (eta 0) is then
        # deterministic whatever the key, and the drawn noise is not what was given
        x_T = np.random.default_rng(9).standard_normal((4, RES // 4, RES // 4, LATENT_CH)).astype(np.float32)
        given = generate(model, params, mixed, RES, x_T=x_T)
        again = model.ldm.generate(params, model.first_stage_params, model.scale_factor, jax.random.PRNGKey(99),
                                   num=4, latent_shape=(RES // 4, RES // 4, LATENT_CH), inputs=mixed,
                                   sampler="ddim", steps=SAMPLE_STEPS, x_T=x_T)
        np.testing.assert_array_equal(given, again)
        assert np.abs(given - x_mixed).max() > 1e-3
        with pytest.raises(ValueError, match=r"x_T has shape \(4, 8, 8, 3\), expected"):
            generate(model, params, mixed, RES, x_T=np.zeros((4, 8, 8, 3), np.float32))
    if run.kind == "superres":  # tiled sampling (the same code path for every kind)
        # the same images when the latents fit in one tile; 16x16 latents in 8x8 tiles run
        np.testing.assert_array_equal(generate(model, params, mixed, RES, tile=RES // 4, tile_overlap=4), x_mixed)
        tiled = generate(model, params, big, 2 * RES, tile=RES // 4, tile_overlap=4)
        assert tiled.shape == large.shape and np.isfinite(tiled).all()

    if run.kind == "inpainting":  # the known pixels come back exactly
        for x, inputs in ((x_mixed, mixed), (large, big)):
            known = np.broadcast_to(inputs["mask"] == 0, x.shape)
            np.testing.assert_array_equal(x[known], inputs["masked_image"][known])
            assert np.abs(x[~known] - inputs["masked_image"][~known]).max() > 1e-3


def test_final_samples_record_the_conditioning(run):
    with np.load(os.path.join(run.workdir, "samples.npz")) as f:
        saved = {k: f[k] for k in f.files}
    images = saved["images"]
    assert images.shape == (4, RES, RES, 3) and images.dtype == np.uint8
    if run.kind == "superres":
        assert saved["inputs"].shape == (4, RES // 4, RES // 4, 3) and saved["targets"].shape == images.shape
    elif run.kind == "inpainting":
        masks = saved["masks"]  # 1 = known
        assert masks.shape == (4, RES, RES) and 0 < masks.mean() < 1
        known = np.broadcast_to(masks[..., None] == 1, images.shape)
        np.testing.assert_array_equal(images[known], saved["targets"][known])
    else:
        seg = saved["segmentations"]
        assert seg.shape == (4, RES, RES) and seg.max() <= SEG_CLASSES - 1
        assert set(saved["labels"]) <= set(range(10))
        np.testing.assert_array_equal(np.unique(seg[0]), [0, 1 + saved["labels"][0]])
    grid = np.asarray(Image.open(os.path.join(run.workdir, "samples_grid.png")))
    columns = 2 if run.kind == "semantic" else 3  # input | sample | target (a made-up map has no target)
    assert columns * RES <= grid.shape[1] < (columns + 1) * RES


# ------------------------------------------------------------------------------------------------- sample.py


def run_sample_py(workdir: str, outdir: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}",
                           f"--outdir={outdir}", "--steps=2", *flags], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def save_png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def assert_refused(result, *needles):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_sample_py_spatial_inputs_and_refusals(run, tmp_path):
    rng = np.random.default_rng(5)
    photo = save_png(tmp_path / "photo.png", rng.integers(0, 256, (2 * RES, 2 * RES, 3), np.uint8))
    out = tmp_path / "out"
    if run.kind == "superres":
        low = save_png(tmp_path / "low.png", rng.integers(0, 256, (16, 24, 3), np.uint8))
        result = run_sample_py(run.workdir, str(out), f"--cond_image={low}")
        assert result.returncode == 0, result.stderr
        with np.load(out / "samples.npz") as f:
            assert f["images"].shape == (1, 64, 96, 3) and f["inputs"].shape == (1, 16, 24, 3)
        x_T = tmp_path / "x_T.npy"
        np.save(x_T, np.zeros((2, 4, 6, LATENT_CH), np.float32))  # 2 samples, but 16x24 gives 16x24 latents
        assert_refused(run_sample_py(run.workdir, str(tmp_path / "o1"), f"--cond_image={low}",
                                     f"--init_latents={x_T}"), "--init_latents", "(2, 4, 6, 2)",
                       "needs (2, 16, 24, 2)")
        odd = save_png(tmp_path / "odd.png", rng.integers(0, 256, (9, 16, 3), np.uint8))
        assert_refused(run_sample_py(run.workdir, str(tmp_path / "o2"), f"--cond_image={odd}"),
                       "--cond_image", "lowres is 9x16", "multiples of 2")
    elif run.kind == "inpainting":
        mask = np.zeros((2 * RES, 2 * RES), np.uint8)
        mask[8:40, 8:40] = 255
        mask_file = save_png(tmp_path / "photo_mask.png", mask)
        result = run_sample_py(run.workdir, str(out), f"--cond_image={photo}", f"--mask={mask_file}")
        assert result.returncode == 0, result.stderr
        with np.load(out / "samples.npz") as f:
            images, masks = f["images"], f["masks"]
        given = np.asarray(Image.open(photo))
        assert images.shape == (1, 2 * RES, 2 * RES, 3) and masks[0, 20, 20] == 0 and masks[0, 50, 50] == 1
        np.testing.assert_array_equal(images[0][masks[0] == 1], given[masks[0] == 1])  # kept exactly
        small = save_png(tmp_path / "small_mask.png", mask[:32, :32])
        assert_refused(run_sample_py(run.workdir, str(tmp_path / "o2"), f"--cond_image={photo}",
                                     f"--mask={small}"), "--mask", "is 32x32 but its image photo.png is 64x64")
    else:
        seg = np.zeros((2 * RES, 2 * RES), np.uint8)
        seg[10:30, 10:30] = 3
        seg_file = save_png(tmp_path / "seg.png", seg)
        result = run_sample_py(run.workdir, str(out), f"--segmentation={seg_file}")
        assert result.returncode == 0, result.stderr
        with np.load(out / "samples.npz") as f:
            assert f["images"].shape == (1, 2 * RES, 2 * RES, 3)
            np.testing.assert_array_equal(f["segmentations"][0], seg)
        seg[0, 0] = SEG_CLASSES
        bad = save_png(tmp_path / "bad.png", seg)
        assert_refused(run_sample_py(run.workdir, str(tmp_path / "o2"), f"--segmentation={bad}"),
                       "--segmentation", "class id 11, outside [0, 11)")
        assert_refused(run_sample_py(run.workdir, str(tmp_path / "o3"), f"--cond_image={bad}"),
                       "--cond_image given", "takes --segmentation")


def test_config_refusals(fs_workdir, tmp_path):
    config = stage2_config("inpainting", fs_workdir)
    config.diffusion.model.in_channels = LATENT_CH + 1
    with pytest.raises(ConfigError, match=r"2 latent channels \+ 3 concatenated conditioning channels "
                                          r"\(kind='inpainting', mode='concat'\): set in_channels=5"):
        train_diffusion(config, str(tmp_path / "a"))
    config = stage2_config("superres", fs_workdir)
    config.diffusion.latent_cache.enabled = True
    with pytest.raises(ConfigError, match="latent cache does not keep: set config.diffusion.latent_cache.enabled"):
        train_diffusion(config, str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
