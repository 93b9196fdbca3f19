"""``python -m lidiff.convert``: released checkpoints (CompVis single file, diffusers folder) -> a lidiff run
directory that ``runs.load_latent_diffusion`` loads, checked against the PyTorch reference models they came from.

The references are tiny random diffusers models (UNet2DModel, AutoencoderKL); the CompVis file is written from
them with the repository's diffusers -> CompVis renaming, plus EMA entries, schedule buffers and scale_factor.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel
from safetensors.numpy import save_file

from lidiff import runs
from lidiff.convert import __main__ as command
from lidiff.convert import infer, run_import
from lidiff.convert.common import ConversionError
from lidiff.convert.diffusers_unet import diffusers_unet_to_compvis
from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis
from lidiff.errors import ConfigError
from lidiff.diffusion.schedule import make_beta_schedule
from lidiff.models.unet import UNetModel
from tests.convert.test_diffusers_vae import randomize  # every parameter random, norm scales near 1

TOL = 1e-4
QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "quickstart.py")
HEADS = "--config.diffusion.model.num_head_channels=16"
# The reference UNet: one attention level (ds 2) + the middle block, 16 channels per head, 4 latent channels,
# class labels added to the time embedding (CompVis "adm": label_emb, 4 classes + the null class).
UNET_KW = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, in_channels=4, out_channels=4,
               sample_size=8, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32,
               num_class_embeds=5)
LIDIFF_UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_head_channels=16)
VAE_KW = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=4,
              norm_num_groups=32, sample_size=32)
LINEAR_START, LINEAR_END, T, SCALE = 0.0015, 0.0195, 1000, 0.3125


class NotATensor:
    """Stands for what a Lightning checkpoint pickles besides tensors (callbacks, hyper-parameter objects)."""


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compvis_buffers() -> dict[str, np.ndarray]:
    """What CompVis ``DDPM.register_schedule`` stores for its "linear" schedule, and a scale_factor buffer."""
    betas = np.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, T, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    prev = np.append(1.0, ac[:-1])
    out = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": np.sqrt(ac),
           "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac), "log_one_minus_alphas_cumprod": np.log(1 - ac),
           "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
           "posterior_variance": betas * (1 - prev) / (1 - ac),
           "posterior_log_variance_clipped": np.log(np.maximum(betas * (1 - prev) / (1 - ac), 1e-20)),
           "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - ac),
           "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - ac), "scale_factor": np.asarray(SCALE)}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def compvis_state_dict(unet, ema_unet, vae) -> dict[str, np.ndarray]:
    """A whole LDM ``state_dict``: UNet, EMA (dotless names), first stage (+ a loss tensor), buffers."""
    model = UNetModel(**LIDIFF_UNET)
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_compvis(unet.state_dict(), model).items()}
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v
               for k, v in diffusers_unet_to_compvis(ema_unet.state_dict(), model).items()})
    sd.update({"model_ema.decay": np.asarray(0.9999, np.float32), "model_ema.num_updates": np.asarray(7, np.int32)})
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(vae.state_dict()).items()})
    sd["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    sd.update(compvis_buffers())
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def refs():
    """(raw UNet, EMA UNet, AutoencoderKL): random PyTorch reference models."""
    return (randomize(UNet2DModel(**UNET_KW), 1), randomize(UNet2DModel(**UNET_KW), 2),
            randomize(TorchKL(**VAE_KW), 3))


@pytest.fixture(scope="module")
def compvis_dict(refs):
    return compvis_state_dict(*refs)


@pytest.fixture(scope="module")
def compvis_file(compvis_dict, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("src") / "ldm.safetensors")
    save_file(compvis_dict, path)
    return path


@pytest.fixture(scope="module")
def compvis_runs(compvis_file, tmp_path_factory):
    """{"ema": (run dir, report), "raw": ...}: the CompVis file imported without --config, with and without EMA."""
    out = {}
    for name, extra in (("ema", []), ("raw", ["--no_ema"])):
        workdir = str(tmp_path_factory.mktemp(name) / "run")
        out[name] = (workdir, command.run(["--src", compvis_file, "--out", workdir, "--resolution", "32", HEADS]
                                          + extra))
    return out


def inputs():
    """x [2, 8, 8, 4], t [2], labels [2], z [2, 8, 8, 4]."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([5, 870], np.int32),
            np.array([1, 4], np.int32), rng.normal(size=(2, 8, 8, 4)).astype(np.float32))


def torch_unet(ref, x, t, labels=None, context=None) -> np.ndarray:
    kwargs = {}
    if labels is not None:
        kwargs["class_labels"] = torch.from_numpy(labels.astype(np.int64))
    if context is not None:
        kwargs["encoder_hidden_states"] = torch.from_numpy(context)
    with torch.no_grad():
        y = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)), **kwargs).sample
    return y.numpy().transpose(0, 2, 3, 1)


def torch_decode(vae, z) -> np.ndarray:
    with torch.no_grad():
        return vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def unet_apply(unet, params, x, t, context, labels):
    """UNet output for x [B, h, w, c], t [B], context [B, L, D] or None, labels [B] or None; compiled once per
    architecture (flax modules hash by their fields)."""
    return unet.apply({"params": params}, x, t, context, labels)


@functools.partial(jax.jit, static_argnums=0)
def decode(first_stage, params, z):
    return first_stage.decode(params, z)


def lidiff_outputs(workdir):
    """(loaded run, UNet output, decoded latents) of the run's model on ``inputs()``."""
    loaded = runs.load_latent_diffusion(workdir)
    x, t, labels, z = inputs()
    cond = loaded.ldm.encode_condition(loaded.params, {"label": labels})  # adm: {"y": labels}
    eps = unet_apply(loaded.ldm.unet, loaded.params["unet"], x, t, None, cond["y"])
    return loaded, np.asarray(eps), np.asarray(decode(loaded.ldm.first_stage, loaded.first_stage_params, z))


# -------------------------------------------------------------------------------------- (1) CompVis file


def test_compvis_file_round_trip_uses_ema_and_matches_pytorch(refs, compvis_runs):
    unet, ema_unet, vae = refs
    workdir, report = compvis_runs["ema"]
    loaded, eps, dec = lidiff_outputs(workdir)
    x, t, labels, z = inputs()
    want_ema, want_raw = torch_unet(ema_unet, x, t, labels), torch_unet(unet, x, t, labels)
    assert rel(eps, want_ema) < TOL, rel(eps, want_ema)
    assert rel(want_raw, want_ema) > 0.1  # the two weight sets really differ
    assert rel(dec, torch_decode(vae, z)) < TOL
    assert report.used_ema and loaded.step == 0
    assert float(loaded.scale_factor) == pytest.approx(SCALE)
    process = loaded.config.diffusion.process
    assert (process.schedule, process.num_timesteps) == ("scaled_linear", T)
    assert process.linear_start == pytest.approx(LINEAR_START, rel=1e-6)
    assert process.linear_end == pytest.approx(LINEAR_END, rel=1e-6)
    np.testing.assert_allclose(np.asarray(loaded.ldm.schedule.alphas_cumprod),
                               compvis_buffers()["alphas_cumprod"], rtol=1e-6)
    text = "\n".join(report.lines)
    assert "scale_factor: 0.3125 (from the checkpoint's scale_factor buffer)" in text
    assert "from the checkpoint's betas buffer" in text
    assert "first_stage_model.loss.*" in text and "model_ema.decay" in text


def _restore(workdir, names):
    from lidiff.checkpoint import Checkpointer

    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), create=False)
    try:
        items, meta, _ = checkpointer.restore_items(names=names)
    finally:
        checkpointer.close()
    return items, meta


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_written_run_holds_raw_params_and_ema_separately(refs, compvis_runs):
    """params = raw weights (what fine-tuning continues), ema_params = EMA (what sampling reads), and no optimizer
    state (train.py starts a fresh one)."""
    items, meta = _restore(compvis_runs["ema"][0], ("params", "ema_params"))
    kernel = lambda p: np.asarray(p["unet"]["out_2"]["kernel"])  # noqa: E731
    unet, ema_unet, _ = refs
    np.testing.assert_allclose(kernel(items["params"]), unet.conv_out.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_allclose(kernel(items["ema_params"]),
                               ema_unet.conv_out.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert json.loads(meta["config"])["stages"] == ["diffusion"]
    assert "opt_state" not in meta["items"] and {"params", "ema_params"} <= set(meta["items"])


def test_no_ema_takes_the_raw_weights(compvis_runs):
    """With --no_ema, what sampling reads (ema_params) is the raw UNet, tensor for tensor."""
    with_ema, _ = _restore(compvis_runs["ema"][0], ("params", "ema_params"))
    raw, _ = _restore(compvis_runs["raw"][0], ("params", "ema_params"))
    assert _same(raw["ema_params"], with_ema["params"]) and _same(raw["params"], with_ema["params"])
    assert not _same(raw["ema_params"], with_ema["ema_params"])
    report = compvis_runs["raw"][1]
    assert not report.used_ema and "--no_ema" in "\n".join(report.lines)


def test_float16_file_is_widened_and_its_schedule_recognised(refs, compvis_dict, tmp_path):
    """Pruned SD-layout files store weights and buffers in float16: params come back float32 (the float16
    values), and the half-precision betas still name the schedule."""
    src = str(tmp_path / "half.safetensors")
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in compvis_dict.items()}, src)
    workdir = str(tmp_path / "run")
    report = run_import.import_checkpoint(src, workdir, resolution=32, overrides={
        "diffusion.model.num_head_channels": "16"})
    items, _ = _restore(workdir, ("params",))
    kernel = np.asarray(items["params"]["unet"]["out_2"]["kernel"])
    want = refs[0].conv_out.weight.detach().numpy().astype(np.float16).astype(np.float32).transpose(2, 3, 1, 0)
    assert kernel.dtype == np.float32 and np.array_equal(kernel, want)
    process = report.config.diffusion.process
    assert (process.schedule, process.linear_start, process.linear_end) == ("scaled_linear", LINEAR_START,
                                                                             LINEAR_END)


# ----------------------------------------------------------------------------------- (5) inference


def test_inferred_architecture_matches_the_source(compvis_runs):
    config = runs.saved_config(compvis_runs["ema"][0])
    m = config.diffusion.model
    got = {k: (tuple(m[k]) if isinstance(m[k], (tuple, list)) else m[k]) for k in LIDIFF_UNET}
    assert got == LIDIFF_UNET
    assert (m.use_spatial_transformer, m.use_scale_shift_norm, m.resblock_updown) == (False, False, False)
    ae = config.autoencoder.model
    assert (ae.kind, ae.ch, tuple(ae.ch_mult), ae.num_res_blocks, ae.z_channels, ae.embed_dim,
            tuple(ae.attn_resolutions), ae.attn_type) == ("kl", 32, (1, 2), 1, 4, 4, (16,), "vanilla")
    c = config.diffusion.conditioning
    assert (c.kind, c.mode, c.num_classes) == ("class", "adm", 4)
    assert "model_channels 32, channel_mult (1, 2)" in "\n".join(compvis_runs["ema"][1].lines)


def test_missing_head_layout_names_the_flag(compvis_file, tmp_path):
    with pytest.raises(ConfigError, match=r"--config\.diffusion\.model\.num_head_channels=") as e:
        run_import.import_checkpoint(compvis_file, str(tmp_path / "run"), resolution=32)
    assert "--config.diffusion.model.num_heads=" in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "diffusion")


# UNet variants the shapes must reveal: (diffusers class, its kwargs, the equivalent lidiff UNetModel kwargs).
INFER_CASES = {
    "scale_shift_updown_adm": (
        UNet2DModel,
        dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",
             "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
             upsample_type="resnet", resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
             attention_head_dim=32, num_class_embeds=7, in_channels=3, out_channels=3),
        dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(2,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
             num_classes=7)),
    "sd2_linear_proj_depth2": (
        UNet2DConditionModel,
        dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
             up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 4), cross_attention_dim=24,
             transformer_layers_per_block=2, use_linear_projection=True, in_channels=4, out_channels=4),
        dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
             attention_resolutions=(1, 2), num_head_channels=16, use_spatial_transformer=True, context_dim=24,
             transformer_depth=2, use_linear_in_transformer=True)),
}


@pytest.mark.parametrize("name", sorted(INFER_CASES))
def test_unet_inference_from_compvis_shapes_and_diffusers_config(name):
    cls, torch_kwargs, lidiff_kwargs = INFER_CASES[name]
    ref = cls(**torch_kwargs, sample_size=8)
    model = UNetModel(**lidiff_kwargs)
    fields = infer.infer_unet(infer.shapes_of(diffusers_unet_to_compvis(ref.state_dict(), model)))
    from_config = infer.unet_fields_from_diffusers(dict(ref.config))
    for key, value in lidiff_kwargs.items():
        if key == "num_classes":
            assert fields["label_classes"] == from_config["label_classes"] == value
        elif key != "num_head_channels":
            assert fields[key] == from_config[key] == value, key
    heads = UNetModel(**{**lidiff_kwargs, "num_heads": from_config["num_heads"],
                         "num_head_channels": from_config["num_head_channels"]})
    for width in (32, 64):  # the head layout read from config.json builds the same attention
        assert heads.heads_at(width) == model.heads_at(width)


def test_vq_autoencoder_inference():
    ref = VQModel(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=2, latent_channels=4,
                  num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32, norm_type="group")
    fields = infer.infer_autoencoder(infer.shapes_of(diffusers_vae_to_compvis(ref.state_dict())), 64)
    assert fields == dict(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(32,),
                          attn_type="vanilla", resolution=64, z_channels=4, embed_dim=3, n_embed=64)


@pytest.mark.parametrize("schedule, start, end", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02),
                                                  ("sqrt", 1e-4, 0.02), ("cosine", 1e-4, 2e-2)])
def test_schedule_inference_from_betas(schedule, start, end):
    betas = make_beta_schedule(schedule, 1000, start, end).astype(np.float32)
    got = infer.infer_schedule(betas, np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32))
    assert got == dict(schedule=schedule, num_timesteps=1000, linear_start=start, linear_end=end)


def test_schedule_inference_from_float16_buffers():
    betas = make_beta_schedule("scaled_linear", 1000, 0.00085, 0.012).astype(np.float16)
    got = infer.infer_schedule(betas, np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float16))
    assert got == dict(schedule="scaled_linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012)


def test_unknown_schedule_is_refused():
    betas = np.geomspace(1e-4, 2e-2, 1000).astype(np.float32)
    with pytest.raises(ConversionError, match="follow none of lidiff's schedules"):
        infer.infer_schedule(betas)


# ----------------------------------------------------------------------------------- (2) diffusers folder


def test_diffusers_folder_round_trip(refs, tmp_path):
    unet, _, vae = refs
    folder = tmp_path / "pipe"
    unet.save_pretrained(folder / "unet")
    vae.register_to_config(scaling_factor=0.25)
    vae.save_pretrained(folder / "vae")
    DDPMScheduler(num_train_timesteps=T, beta_start=LINEAR_START, beta_end=LINEAR_END, beta_schedule="scaled_linear",
                  prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "vae": ["diffusers", "AutoencoderKL"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    workdir = str(tmp_path / "run")
    report = command.run(["--src", str(folder), "--out", workdir, "--resolution", "32"])  # heads from config.json
    loaded, eps, dec = lidiff_outputs(workdir)
    x, t, labels, z = inputs()
    assert rel(eps, torch_unet(unet, x, t, labels)) < TOL
    assert rel(dec, torch_decode(vae, z)) < TOL
    assert float(loaded.scale_factor) == pytest.approx(0.25)
    assert loaded.config.diffusion.process.parameterization == "v"
    assert loaded.config.diffusion.model.num_head_channels == 16
    assert "diffusers checkpoint" in report.lines[0]


# ----------------------------------------------------------------------------------------------- --config

CONFIG_FILE = '''
import importlib.util

spec = importlib.util.spec_from_file_location("base", {base!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)


def get_config():
    unet = base.unet_model(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_head_channels=16)
    diffusion = base.diffusion_stage(unet, batch_size=8, learning_rate=1e-4, schedule="linear", linear_start=1e-4,
                                     linear_end=0.02, num_timesteps=500)
    diffusion.conditioning = base.conditioning("class", mode="adm", num_classes=4)
    diffusion.first_stage.scale_factor = 0.5
    ae = base.autoencoder_model("kl", ch_mult=(1, 2), z_channels=4, embed_dim=4, attn_resolutions=(16,), ch=32,
                                num_res_blocks=1, resolution=32)
    return base.experiment(("autoencoder", "diffusion"), base.data_config("synthetic", resolution=32),
                           base.autoencoder_stage(ae, base.autoencoder_loss(), 8, 1e-4), diffusion)
'''


def test_config_file_gives_what_the_checkpoint_does_not_store(refs, compvis_dict, tmp_path):
    """--config describes the model; schedule and scale_factor come from it when the file has no buffers; a
    config that contradicts the tensor shapes is refused."""
    base_py = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "base.py")
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(base=os.path.abspath(base_py)))
    src = str(tmp_path / "no_buffers.safetensors")
    save_file({k: v for k, v in compvis_dict.items() if k not in compvis_buffers()}, src)
    with pytest.raises(ConversionError, match="diffusion.model.model_channels: checkpoint 32, config 64"):
        run_import.import_checkpoint(src, str(tmp_path / "bad"), config_file=str(config_file),
                                     overrides={"diffusion.model.model_channels": "64"})
    workdir = str(tmp_path / "run")
    report = command.run(["--src", src, "--out", workdir, "--config", str(config_file)])
    loaded, eps, _ = lidiff_outputs(workdir)
    x, t, labels, _ = inputs()
    assert rel(eps, torch_unet(refs[1], x, t, labels)) < TOL  # the EMA weights
    process = loaded.config.diffusion.process
    assert (process.schedule, process.num_timesteps, process.linear_end) == ("linear", 500, 0.02)
    assert float(loaded.scale_factor) == 0.5 and tuple(loaded.config.stages) == ("diffusion",)
    text = "\n".join(report.lines)
    assert f"scale_factor: 0.5 (from --config={config_file}" in text
    assert f"linear_end 0.02 (from --config={config_file}" in text
    assert runs.saved_config(workdir).to_json() == _config_py(workdir).to_json()


def _config_py(workdir):
    """``get_config()`` of the run's written config.py (what train.py --config reads)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("imported_config", os.path.join(workdir, "config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def quickstart_source(path: str):
    """A CompVis file of configs/quickstart.py's architecture (class embedder -> cross-attention, 4 heads of
    width C/4; KL-f4 with z 3) -> the class table [11, 64] it holds."""
    unet = randomize(UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, cross_attention_dim=64,
        in_channels=3, out_channels=3, sample_size=8, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5), 4)
    vae = randomize(TorchKL(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=3,
                            norm_num_groups=32), 5)
    model = UNetModel(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=4, legacy=False, use_spatial_transformer=True,
                      context_dim=64)
    table = np.random.default_rng(6).normal(size=(11, 64)).astype(np.float32)
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_compvis(unet.state_dict(), model).items()}
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(vae.state_dict()).items()})
    sd["cond_stage_model.embedding.weight"] = table
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, path)
    return table


def test_class_embedder_cond_stage(tmp_path):
    """cin-style ``cond_stage_model.embedding.weight``: inferred as a cross-attention class model matching
    configs/quickstart.py, and converted into params["cond"] (raw and EMA: CompVis keeps no EMA of it)."""
    src = str(tmp_path / "cin.safetensors")
    table = quickstart_source(src)
    source = run_import.read_source(src, None)
    inferred, lines = run_import.build_config(source, None, {"diffusion.model.num_heads": "4"}, 32)
    given, _ = run_import.build_config(source, QUICKSTART, {}, 32)
    for name in ("model_channels", "channel_mult", "attention_resolutions", "num_res_blocks", "context_dim",
                 "use_spatial_transformer", "transformer_depth", "use_linear_in_transformer", "in_channels"):
        assert inferred.diffusion.model[name] == given.diffusion.model[name], name
    for name in ("kind", "mode", "num_classes", "embed_dim"):
        assert inferred.diffusion.conditioning[name] == given.diffusion.conditioning[name], name
    assert "conditioning: class (crossattn), num_classes 10, embed_dim 64" in "\n".join(lines)
    trainer = run_import.build_trainer(given, str(tmp_path / "run"))
    _, params, ema, _ = run_import.convert_params(source, given, trainer, use_ema=True)
    np.testing.assert_array_equal(params["cond"]["embedding"]["embedding"], table)
    assert ema["cond"] is params["cond"]


# ---------------------------------------------------------------------------------------- (3) strictness


def _ckpt(tmp_path, state) -> str:
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, "global_step": 3},
               path)
    return path


@pytest.mark.parametrize("change, key, named", [
    # a missing tensor is named by the lidiff param it should fill; the others by their CompVis key
    ("missing", "model.diffusion_model.middle_block.0.in_layers.2.bias", "missing (1): middle_block_0/in_layers_2/bias"),
    ("extra", "model.diffusion_model.middle_block.0.extra.weight", "unexpected (1): middle_block.0.extra.weight"),
    ("shape", "first_stage_model.decoder.conv_out.bias", "shape mismatch (1): decoder.conv_out.bias (5,)"),
])
def test_mismatching_tensors_are_refused_by_name(compvis_dict, tmp_path, change, key, named):
    state = dict(compvis_dict)
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key] = np.ones((3, 3), np.float32)
    else:
        state[key] = np.ones((5,), np.float32)
    with pytest.raises(ConversionError) as e:
        run_import.import_checkpoint(_ckpt(tmp_path, state), str(tmp_path / "run"), resolution=32,
                                     overrides={"diffusion.model.num_head_channels": "16"})
    assert named in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "run" / "diffusion")


def test_unknown_tensor_fails_in_the_command_without_traceback(compvis_dict, tmp_path, capsys):
    state = dict(compvis_dict, **{"some_other_model.weight": np.ones((2,), np.float32)})
    path = str(tmp_path / "x.safetensors")
    save_file(state, path)
    with pytest.raises(SystemExit) as e:
        command.main(["--src", path, "--out", str(tmp_path / "run"), HEADS])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error:") and "some_other_model.weight" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------- (4) unsafe pickles


def test_ckpt_with_pickled_objects_is_refused(tmp_path, capsys):
    path = str(tmp_path / "unsafe.ckpt")
    torch.save({"state_dict": {"betas": torch.ones(3)}, "hyper_parameters": NotATensor()}, path)
    with pytest.raises(SystemExit) as e:
        command.main(["--src", path, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot be read safely" in err and "NotATensor" in err and ".safetensors" in err
    assert "Traceback" not in err
