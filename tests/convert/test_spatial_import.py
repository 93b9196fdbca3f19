"""``python -m lidiff.convert`` on CompVis spatial-conditioning files (``concat`` mode): the conditioning kind is
read from the tensors (semantic: ``cond_stage_model.channel_mapper.weight``; super-resolution and inpainting: the
UNet's extra input channels) and the written run builds the model.

The sources are tiny random CompVis files made as tests/convert/test_convert_command.py makes them (diffusers
UNet2DModel renamed to CompVis keys, a KL-f2 first stage with 4 latent channels), with a UNet that takes the
latent plus the concatenated channels. The UNet's own parity to PyTorch is tested in test_convert_command.py; here
its params must be the source's, and the semantic encoder's map must equal PyTorch's SpatialRescaler arithmetic.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import UNet2DModel
from safetensors.numpy import save_file

from lidiff import runs
from lidiff.convert import __main__ as command
from lidiff.convert import import_spatial, run_import
from lidiff.convert.diffusers_unet import diffusers_unet_to_compvis, unet_params_from_diffusers
from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis
from lidiff.convert.read_source import SourceMismatch
from lidiff.errors import ConfigError
from lidiff.models.unet import UNetModel
from tests.convert.test_convert_command import HEADS, LIDIFF_UNET, UNET_KW, VAE_KW, compvis_buffers, rel
from tests.convert.test_diffusers_vae import randomize

LATENT, F, RESOLUTION = 4, 2, 32  # the helpers' KL first stage: 4 latent channels, f = 2
CLASSES, MAP = 10, 3  # the semantic model's one-hot classes and its 1x1 map's width
# The helpers' reference UNet with one level and no attention outside the middle block (as test_finetune_import),
# without class labels, and their KL-f2 autoencoder without attention outside its middle blocks: fewer tensors to
# trace, convert and save.
UNET = dict(UNET_KW, block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
            num_class_embeds=None)
LIDIFF = dict(LIDIFF_UNET, channel_mult=(1,), attention_resolutions=())
VAE = dict(VAE_KW, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def source_file(tmp_path, extra: int, latent: int = LATENT, cond: dict | None = None):
    """A CompVis file (raw and EMA UNets, KL first stage, schedule buffers, scale_factor, cond-stage tensors
    ``cond``) whose UNet takes ``latent + extra`` channels -> (path, the EMA UNet as lidiff params)."""
    raw, ema = (randomize(UNet2DModel(**dict(UNET, in_channels=latent + extra, out_channels=latent)), seed)
                for seed in (11, 12))
    model = UNetModel(**dict(LIDIFF, in_channels=latent + extra, out_channels=latent))
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_compvis(raw.state_dict(), model).items()}
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v
               for k, v in diffusers_unet_to_compvis(ema.state_dict(), model).items()})
    vae = randomize(TorchKL(**dict(VAE, latent_channels=latent)), 13)
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(vae.state_dict()).items()})
    sd.update(compvis_buffers())
    sd.update({"cond_stage_model." + k: v for k, v in (cond or {}).items()})
    path = str(tmp_path / "ldm.safetensors")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, path)
    return path, unet_params_from_diffusers(ema.state_dict(), model)


def import_run(tmp_path, path, *flags):
    """``python -m lidiff.convert`` into ``tmp_path/run`` -> (the report, ``runs.load_latent_diffusion`` of it)."""
    out = str(tmp_path / "run")
    report = command.run(["--src", path, "--out", out, "--resolution", str(RESOLUTION), HEADS, *flags])
    return report, runs.load_latent_diffusion(out)


def assert_same_tree(a, b):
    """Same paths, every leaf bitwise equal."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (where, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(where))


def test_semantic_model_from_its_channel_mapper(tmp_path):
    weight = np.random.default_rng(0).normal(size=(MAP, CLASSES, 1, 1)).astype(np.float32)
    path, unet = source_file(tmp_path, MAP, cond={"channel_mapper.weight": weight})
    report, loaded = import_run(tmp_path, path)
    c = loaded.config.diffusion.conditioning
    assert (c.kind, c.mode, c.num_classes, c.map_channels) == ("semantic", "concat", CLASSES, MAP)
    assert loaded.config.data.source == "segmentation_folder"
    text = "\n".join(report.lines)
    assert f"from cond_stage_model.channel_mapper.weight [{MAP}, {CLASSES}, 1, 1]" in text, text
    kernel = np.asarray(loaded.params["cond"]["channel_mapper"]["kernel"])
    np.testing.assert_array_equal(kernel, weight.transpose(2, 3, 1, 0))  # torch [out, in, 1, 1] -> [1, 1, in, out]
    assert_same_tree(loaded.params["unet"], unet)

    seg = np.random.default_rng(1).integers(0, CLASSES, size=(2, 16, 16)).astype(np.int32)
    concat = loaded.trainer.ldm.encode_condition(loaded.params, {"segmentation": seg})["concat"]
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(seg).long(), CLASSES).permute(0, 3, 1, 2).float()
    x = one_hot
    for _ in range(int(np.log2(F))):  # CompVis SpatialRescaler(n_stages=log2 f, method="bilinear", multiplier=0.5)
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
    ref = torch.nn.functional.conv2d(x, torch.from_numpy(weight)).numpy().transpose(0, 2, 3, 1)
    assert concat.shape == (2, 8, 8, MAP)
    assert rel(concat, ref) < 1e-5

    # strict as the rest: a cond-stage tensor the encoder has no place for is named
    source = run_import.read_source(path, None)
    source.cond["channel_mapper.bias"] = np.zeros((MAP,), np.float32)
    with pytest.raises(SourceMismatch, match=r"(?s)semantic map encoder \(cond_stage_model\.\*\).*channel_mapper\.bias"):
        run_import.convert_params(source, loaded.config, loaded.trainer, use_ema=True)


@pytest.mark.parametrize("extra, kind", [(3, "superres"), (LATENT + 1, "inpainting")])
def test_concat_model_without_cond_tensors(tmp_path, extra, kind):
    path, unet = source_file(tmp_path, extra)
    report, loaded = import_run(tmp_path, path)
    c = loaded.config.diffusion.conditioning
    assert (c.kind, c.mode) == (kind, "concat")
    text = "\n".join(report.lines)
    assert f"{kind} (no cond-stage tensors): the UNet takes {LATENT + extra} input channels = {LATENT} latent + " \
           f"{extra} concatenated" in text, text
    if kind == "superres":
        assert c.sr_factor == F and c.degradation == "bicubic"  # the low-res image is latent-sized; config default
        inputs = {"lowres": np.random.default_rng(2).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)}
    else:
        inputs = {"masked_image": np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32),
                  "mask": np.zeros((1, 16, 16, 1), np.float32)}
    encode = functools.partial(loaded.trainer.ldm.encode_condition, latent_hw=(8, 8))
    cond = jax.eval_shape(lambda p, x, fs: encode(p, x, first_stage_params=fs), loaded.params, inputs,
                          loaded.first_stage_params)  # traces the encoder (inpainting: the first stage's)
    assert cond["concat"].shape == (1, 8, 8, extra)
    if kind == "superres":  # Identity: the latent-sized image as it is
        np.testing.assert_array_equal(encode(loaded.params, inputs)["concat"], inputs["lowres"])
    assert loaded.params["cond"] == {}
    assert_same_tree(loaded.params["unet"], unet)


def test_ambiguous_channels_are_refused_naming_the_flag(tmp_path):
    # 2 latent channels + 3: a low-res RGB image (3) and the masked image's encoding + mask (2 + 1) both fit
    path, _ = source_file(tmp_path, 3, latent=2)
    with pytest.raises(ConfigError) as e:
        import_run(tmp_path, path)
    message = str(e.value)
    assert "--config.diffusion.conditioning.kind=superres or --config.diffusion.conditioning.kind=inpainting" \
        in message, message
    assert not (tmp_path / "run" / "diffusion").exists()


def test_user_kind_wins(tmp_path):
    """--config.diffusion.conditioning.kind decides an ambiguous file, and wins over the channel rule of one the
    rule decides (4 latent + 3: superres by the rule; a one-hot map of 3 classes as the user says)."""
    (tmp_path / "ambiguous").mkdir()
    (tmp_path / "rgb").mkdir()
    ambiguous, rgb = source_file(tmp_path / "ambiguous", 3, latent=2)[0], source_file(tmp_path / "rgb", 3)[0]
    overrides = {"diffusion.model.num_head_channels": "16"}
    for path, kind, want in ((ambiguous, "inpainting", dict(mode="concat")),
                             (rgb, "semantic", dict(mode="concat", num_classes=3, map_channels=0))):
        source = run_import.read_source(path, None)
        config, lines = run_import.build_config(source, None, {**overrides, "diffusion.conditioning.kind": kind},
                                                RESOLUTION)
        c = config.diffusion.conditioning
        assert c.kind == kind and {k: c[k] for k in want} == want
        assert f"{kind} (from --config.diffusion.conditioning.kind" in "\n".join(lines)
        run_import.build_trainer(config, str(tmp_path / "run"))  # check_conditioning, check_unet_channels pass


def test_channel_rules():
    """The rules without files: extra 3 -> superres, latent + 1 -> inpainting, neither -> refused naming semantic;
    a kind the user gives is taken even where the counts say otherwise."""
    assert import_spatial.concat_fields(7, 4, 4)[0] == dict(kind="superres", mode="concat", sr_factor=4)
    assert import_spatial.concat_fields(7, 3, 4)[0]["kind"] == "inpainting"
    assert import_spatial.concat_fields(9, 3, 4)[0] == {}
    assert import_spatial.concat_fields(5, 2, 4)[0] == {}  # both fit
    assert "--config.diffusion.conditioning.kind=semantic (num_classes 6)" in import_spatial.undetermined(9, 3)
    fields, lines = import_spatial.concat_fields(7, 4, 4, user_kind="semantic")
    assert fields == dict(kind="semantic", mode="concat", num_classes=3, map_channels=0)
    assert "would give superres" in lines[0]
