"""``python -m lidiff.export``: a lidiff run directory -> a diffusers folder that diffusers (PyTorch) loads with
``from_pretrained`` and that computes what the PyTorch models the run was imported from compute, and what lidiff
computes.

Round trips on tiny random models: diffusers / CompVis PyTorch weights -> ``python -m lidiff.convert`` -> a run
-> ``python -m lidiff.export`` -> ``from_pretrained``: a cross-attention UNet2DConditionModel + AutoencoderKL
(class embedder left out), an unconditional UNet2DModel + VQModel (an LDMPipeline that samples what lidiff's DDIM
samples), adm class embeddings and other UNet layouts converted directly, and a frozen-CLIP text run exported as a
StableDiffusionPipeline.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchKL
from diffusers import DDIMScheduler, DDPMScheduler, LDMPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers import UNet2DModel, VQModel
from ml_collections import ConfigDict
from safetensors.numpy import save_file

from lidiff import runs
from lidiff.checkpoint import Checkpointer
from lidiff.convert import __main__ as import_command
from lidiff.convert import infer
from lidiff.convert.diffusers_configs import autoencoder_config, scheduler_config, unet_config
from lidiff.convert.diffusers_unet import diffusers_unet_to_compvis, unet_params_from_diffusers
from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis
from lidiff.convert.to_diffusers import unet_state_dict_to_diffusers
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.errors import ConfigError
from lidiff.export import __main__ as export_command
from lidiff.export.pipelines import plan_pipeline
from lidiff.models.autoencoder import AutoencoderKL as LidiffKL
from lidiff.models.quantizer import VQModel as LidiffVQ
from lidiff.models.unet import UNetModel
from lidiff.train.builders import build_unet
from tests.clip_support import tiny_clip_tokenizer, write_tiny_clip_text_encoder
from tests.convert.test_convert_command import INFER_CASES, LINEAR_END, LINEAR_START, T, UNET_KW, VAE_KW
from tests.convert.test_convert_command import rel, torch_decode, torch_unet, unet_apply
from tests.convert.test_diffusers_vae import randomize

TOL = 1e-4
SCALE = 0.3125
# Cross-attention reference: attention at level 1 + the middle, heads (2, 4) = 16 channels each, linear proj_in,
# context 64 (the class embedder's width); its lidiff twin, for the CompVis key renaming.
CROSS_KW = dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=64,
                use_linear_projection=True, in_channels=4, out_channels=4, sample_size=8, flip_sin_to_cos=True,
                freq_shift=0, norm_eps=1e-5)
CROSS_LIDIFF = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(2,), num_head_channels=16, use_spatial_transformer=True, context_dim=64,
                    use_linear_in_transformer=True)
# The unconditional case is small (it is sampled with lidiff's DDIM): one UNet level with attention, and an f=2
# VQ autoencoder with attention in the middle only.
UNCOND_KW = dict(block_out_channels=(32,), layers_per_block=1, down_block_types=("AttnDownBlock2D",),
                 up_block_types=("AttnUpBlock2D",), attention_head_dim=16, in_channels=4, out_channels=4,
                 sample_size=8, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32)
VQ_KW = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, num_vq_embeddings=64,
             vq_embed_dim=4, norm_num_groups=32, norm_type="group", sample_size=32, scaling_factor=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference models are tiny: one PyTorch thread is several times faster than two beside JAX's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same_tensors(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    """Every tensor of ``module`` equals ``reference``'s, and they have the same keys."""
    a, b = module.state_dict(), reference.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def load(cls, folder: str, subfolder: str):
    """``cls.from_pretrained`` that fails on any missing, unexpected or mis-shaped weight."""
    model, info = cls.from_pretrained(folder, subfolder=subfolder, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def restore(workdir: str, names: tuple[str, ...]):
    """Items ``names`` of the run's newest stage-2 checkpoint (host arrays), and its config."""
    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), create=False)
    try:
        items, meta, _ = checkpointer.restore_items(names=names)
    finally:
        checkpointer.close()
    return items, ConfigDict(json.loads(meta["config"]))


def export(workdir: str, out: str, *extra: str):
    return export_command.run(["--workdir", workdir, "--out", out, *extra])


def inputs():
    """x [2, 8, 8, 4], t [2], labels [2] in [0, 10), z [2, 8, 8, 4]."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([5, 870], np.int32),
            np.array([1, 7], np.int32), rng.normal(size=(2, 8, 8, 4)).astype(np.float32))


# ------------------------------------------------------------------------ (1) cross-attention UNet + KL


@pytest.fixture(scope="module")
def cross_case(tmp_path_factory):
    """A CompVis file (UNet2DConditionModel, its EMA, AutoencoderKL, class table [11, 64], scale_factor) imported
    and exported -> dict(unet, ema_unet, vae, table, workdir, out, report)."""
    root = tmp_path_factory.mktemp("cross")
    unet, ema_unet = randomize(UNet2DConditionModel(**CROSS_KW), 1), randomize(UNet2DConditionModel(**CROSS_KW), 2)
    vae = randomize(TorchKL(**VAE_KW), 3)
    twin = UNetModel(**CROSS_LIDIFF)
    table = np.random.default_rng(4).normal(size=(11, 64)).astype(np.float32)
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_compvis(unet.state_dict(), twin).items()}
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v
               for k, v in diffusers_unet_to_compvis(ema_unet.state_dict(), twin).items()})
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(vae.state_dict()).items()})
    sd.update({"cond_stage_model.embedding.weight": table, "scale_factor": np.asarray(SCALE, np.float32)})
    src = str(root / "ldm.safetensors")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, src)
    workdir, out = str(root / "run"), str(root / "exported")
    import_command.run(["--src", src, "--out", workdir, "--resolution", "32",
                        "--config.diffusion.model.num_head_channels=16"])
    report = export(workdir, out)
    return dict(unet=unet, ema_unet=ema_unet, vae=vae, table=table, workdir=workdir, out=out, report=report)


def test_cross_attention_unet_and_kl_autoencoder_round_trip(cross_case):
    out, table = cross_case["out"], cross_case["table"]
    unet, vae = load(UNet2DConditionModel, out, "unet"), load(TorchKL, out, "vae")
    assert same_tensors(unet, cross_case["ema_unet"]) and same_tensors(vae, cross_case["vae"])
    assert (unet.config.attention_head_dim, unet.config.use_linear_projection) == ([2, 4], True)
    x, t, labels, z = inputs()
    context = table[labels][:, None, :]  # what lidiff's class embedder feeds the UNet: [2, 1, 64]
    got = torch_unet(unet, x, t, context=context)
    assert rel(got, torch_unet(cross_case["ema_unet"], x, t, context=context)) < TOL
    items, config = restore(cross_case["workdir"], ("ema_params",))  # what sampling reads
    np.testing.assert_array_equal(items["ema_params"]["cond"]["embedding"]["embedding"], table)
    lidiff_unet = build_unet(config.diffusion.model)
    lidiff_eps = unet_apply(lidiff_unet, items["ema_params"]["unet"], x, t, context, None)
    assert rel(got, lidiff_eps) < TOL, rel(got, lidiff_eps)
    assert rel(torch_decode(vae, z), torch_decode(cross_case["vae"], z)) < TOL
    assert vae.config.scaling_factor == SCALE


def test_no_ema_exports_the_raw_weights(cross_case, tmp_path):
    report = export(cross_case["workdir"], str(tmp_path / "raw"), "--no_ema")
    assert same_tensors(load(UNet2DConditionModel, report.out, "unet"), cross_case["unet"])
    assert not same_tensors(cross_case["unet"], cross_case["ema_unet"])
    assert "raw params (params, --no_ema)" in report.lines[1]


def test_class_embedder_is_named_as_left_out(cross_case):
    """No diffusers component holds the class embedder: components only, and the report says why."""
    report = cross_case["report"]
    assert report.pipeline is None and not os.path.exists(os.path.join(cross_case["out"], "model_index.json"))
    assert sorted(os.listdir(cross_case["out"])) == ["scheduler", "unet", "vae"]
    text = "\n".join(report.lines)
    assert "left out: the class conditioning encoder's params['cond'] (704 parameters)" in text
    assert "no diffusers pipeline (or component) holds lidiff's class embedder" in text
    assert "scaling_factor 0.3125 = the checkpoint's scale_factor" in text


# ---------------------------------------------------------------- (2)+(3) unconditional UNet2DModel + VQModel


@pytest.fixture(scope="module")
def vq_case(tmp_path_factory):
    """A diffusers folder (UNet2DModel, VQModel with scaling_factor 0.5, DDPMScheduler) imported and exported."""
    root = tmp_path_factory.mktemp("vq")
    unet, vq = randomize(UNet2DModel(**UNCOND_KW), 5), randomize(VQModel(**VQ_KW), 6)
    unet.save_pretrained(root / "src" / "unet")
    vq.save_pretrained(root / "src" / "vqvae")
    DDPMScheduler(num_train_timesteps=T, beta_start=LINEAR_START, beta_end=LINEAR_END,
                  beta_schedule="scaled_linear").save_pretrained(root / "src" / "scheduler")
    (root / "src" / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline"}))
    workdir, out = str(root / "run"), str(root / "exported")
    import_command.run(["--src", str(root / "src"), "--out", workdir, "--resolution", "32"])
    return dict(unet=unet, vq=vq, workdir=workdir, out=out, report=export(workdir, out))


def test_unconditional_unet_and_vq_autoencoder_round_trip(vq_case):
    out = vq_case["out"]
    unet, vq = load(UNet2DModel, out, "unet"), load(VQModel, out, "vqvae")
    assert same_tensors(unet, vq_case["unet"]) and same_tensors(vq, vq_case["vq"])
    x, t, _, z = inputs()
    assert rel(torch_unet(unet, x, t), torch_unet(vq_case["unet"], x, t)) < TOL
    assert rel(torch_decode(vq, z), torch_decode(vq_case["vq"], z)) < TOL
    assert vq.config.scaling_factor == 0.5 and unet.config.sample_size == 16  # 32 px / f 2


def test_ldm_pipeline_samples_what_lidiff_samples(vq_case):
    """LDMPipeline (DDIM, 4 steps) from the same starting noise gives lidiff's DDIM images."""
    assert vq_case["report"].pipeline == "LDMPipeline"
    pipe = LDMPipeline.from_pretrained(vq_case["out"])
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(pipe.vqvae, VQModel)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))  # what the pipeline draws
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                  output_type="np").images
    loaded = runs.load_latent_diffusion(vq_case["workdir"])
    want = loaded.ldm.generate(loaded.params, loaded.first_stage_params, loaded.scale_factor, jax.random.key(0),
                               num=2, latent_shape=(16, 16, 4), sampler="ddim", steps=4,
                               x_T=noise.numpy().transpose(0, 2, 3, 1))
    want = np.clip(want / 2 + 0.5, 0.0, 1.0)
    assert images.shape == want.shape == (2, 32, 32, 3)
    assert rel(images, want) < TOL, rel(images, want)


def test_scheduler_betas_are_lidiffs(vq_case):
    scheduler = DDIMScheduler.from_pretrained(vq_case["out"], subfolder="scheduler")
    process = runs.saved_config(vq_case["workdir"]).diffusion.process
    assert (process.schedule, process.linear_start, process.linear_end) == ("scaled_linear", LINEAR_START, LINEAR_END)
    lidiff_betas = DiffusionSchedule.create(process.schedule, process.num_timesteps, process.linear_start,
                                            process.linear_end).betas
    # diffusers recomputes the named schedule in float32: equal to lidiff's betas up to float32 rounding
    np.testing.assert_allclose(scheduler.betas.numpy(), np.asarray(lidiff_betas), rtol=3e-7, atol=0)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    assert (scheduler.config.steps_offset, scheduler.config.set_alpha_to_one, scheduler.config.clip_sample) == (
        1, False, False)


@pytest.mark.parametrize("schedule, parameterization", [("scaled_linear", "eps"), ("linear", "v"), ("cosine", "x0"),
                                                        ("sqrt", "eps")])
def test_every_schedule_reaches_diffusers(schedule, parameterization):
    """Named diffusers schedules where their definition is lidiff's (read back by the importer), else the betas."""
    process = dict(schedule=schedule, num_timesteps=500, linear_start=1e-4, linear_end=0.02,
                   parameterization=parameterization)
    config, _ = scheduler_config(process)
    scheduler = DDIMScheduler.from_config(config)
    want = np.asarray(DiffusionSchedule.create(schedule, 500, 1e-4, 0.02).betas)
    if schedule == "sqrt":
        assert config["trained_betas"] is not None
        np.testing.assert_array_equal(scheduler.betas.numpy(), want)
    else:
        assert config["trained_betas"] is None
        np.testing.assert_allclose(scheduler.betas.numpy(), want, rtol=3e-7, atol=0)
        assert infer.process_from_diffusers_scheduler(config) == process


# ------------------------------------------------------------------------- (4) adm class labels, other layouts


@pytest.mark.parametrize("name", ["adm", "scale_shift_updown_adm"])
def test_unet_layouts_convert_back_to_their_diffusers_model(name):
    """lidiff params of a diffusers UNet -> exported config + state dict -> a diffusers model with the reference's
    tensors and outputs: adm class embeddings (num_class_embeds), and with scale-shift norm + resblock up/down."""
    if name == "adm":
        cls, kwargs, lidiff_kwargs = UNet2DModel, UNET_KW, dict(in_channels=4, out_channels=4, model_channels=32,
                                                                channel_mult=(1, 2), num_res_blocks=1,
                                                                attention_resolutions=(2,), num_head_channels=16,
                                                                num_classes=5)
    else:
        cls, kwargs, lidiff_kwargs = INFER_CASES[name]
        kwargs = dict(kwargs, sample_size=8)
    ref = randomize(cls(**kwargs), 8)
    model = UNetModel(**lidiff_kwargs)
    state = unet_state_dict_to_diffusers(unet_params_from_diffusers(ref.state_dict(), model), model)
    config = unet_config(model, 8)
    assert config["_class_name"] == cls.__name__
    exported = cls.from_config(config).eval()
    exported.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert same_tensors(exported, ref)
    x, t, _, _ = inputs()
    x = x[..., :ref.config.in_channels]
    labels = np.array([1, 4], np.int32) if ref.config.num_class_embeds else None
    context = (np.random.default_rng(1).normal(size=(2, 3, ref.config.cross_attention_dim)).astype(np.float32)
               if cls is UNet2DConditionModel else None)
    got = torch_unet(exported, x, t, labels, context)
    assert rel(got, torch_unet(ref, x, t, labels, context)) < TOL


@pytest.mark.parametrize("name", ["cross", *sorted(INFER_CASES)])
def test_unet_config_is_the_inverse_of_the_importers_reading(name):
    """``unet_config`` -> the importer's ``unet_fields_from_diffusers`` gives the UNet's fields back, and a head
    layout with the same heads at every width (depth-2 transformers and per-level heads included)."""
    kwargs = CROSS_LIDIFF if name == "cross" else INFER_CASES[name][2]
    model = UNetModel(**kwargs)
    fields = infer.unet_fields_from_diffusers(unet_config(model, 8))
    for key, value in kwargs.items():
        if key == "num_classes":
            assert fields["label_classes"] == value
        elif key not in ("num_heads", "num_head_channels"):
            assert fields[key] == value, key
    heads = {k: fields[k] for k in ("num_heads", "num_head_channels")}
    read_back = UNetModel(**{**kwargs, **heads})
    for width in (32, 64):
        assert read_back.heads_at(width) == model.heads_at(width)


def test_unets_diffusers_cannot_express_are_refused_by_field():
    with pytest.raises(ConfigError, match=r"config\.diffusion\.model\.num_heads=4 gives head widths"):
        unet_config(UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(1, 2), num_heads=4), 8)
    with pytest.raises(ConfigError, match=r"config\.diffusion\.model\.resblock_updown=True at cross-attention"):
        unet_config(UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(2,), num_heads=4, resblock_updown=True,
                              use_spatial_transformer=True, context_dim=8), 8)


def test_autoencoders_diffusers_cannot_express_are_refused_by_field():
    with pytest.raises(ConfigError, match=r"config\.autoencoder\.model: z_channels=3 differs from embed_dim=4"):
        autoencoder_config(LidiffKL(ch=32, ch_mult=(1, 2), z_channels=3, embed_dim=4), 1.0)
    with pytest.raises(ConfigError, match=r"config\.autoencoder\.model\.l2_normalized_codes=True"):
        autoencoder_config(LidiffVQ(ch=32, ch_mult=(1, 2), use_l2_normalized_codes=True), 1.0)


def conditioning(kind: str, mode: str = "crossattn", **fields) -> ConfigDict:
    cond = dict(kind=kind, mode=mode, num_classes=10, embed_dim=64, max_length=77, encoder="transformer")
    return ConfigDict({"diffusion": {"conditioning": {**cond, **fields}}})


@pytest.mark.parametrize("config, unet, first_stage, pipeline, reason", [
    (conditioning("none"), "UNet2DModel", "vq", "LDMPipeline", "LDMPipeline (unconditional UNet2DModel + VQModel"),
    (conditioning("none"), "UNet2DModel", "kl", None, "LDMPipeline cannot express this model: it decodes with a "
                                                      "VQModel (component vqvae), this run's first stage is KL"),
    (conditioning("text", encoder="clip", clip_output="penultimate"), "UNet2DConditionModel", "kl",
     "StableDiffusionPipeline", "call it with clip_skip=1"),
    (conditioning("text", encoder="clip", clip_output="last"), "UNet2DConditionModel", "vq", None,
     "StableDiffusionPipeline cannot express this model: it decodes with an AutoencoderKL, this run's first stage "
     "is VQ"),
    (conditioning("text"), "UNet2DConditionModel", "kl", None, "this model's text encoder is the jointly trained "
                                                               "BERT-style transformer"),
    (conditioning("class", "adm"), "UNet2DModel", "kl", None, "class_labels [B] in [0, 10) (10 is the null class"),
])
def test_pipeline_choice_names_why(config, unet, first_stage, pipeline, reason):
    plan = plan_pipeline(config, unet, first_stage, tokenizer_dir="")
    assert plan.name == pipeline and (plan.model_index is None) == (pipeline is None)
    assert reason in "\n".join(plan.lines)
    if pipeline:
        assert plan.model_index["_class_name"] == pipeline


# ------------------------------------------------------------------------------------- frozen CLIP text models


def write_clip_folders(workdir: str) -> None:
    """A tiny CLIPTextModel (width 64 = the UNet's context) and CLIP tokenizer (prompts of 77 tokens) at the run's
    text folders."""
    write_tiny_clip_text_encoder(runs.text_encoder_dir(workdir), hidden=64, max_positions=77)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(runs.tokenizer_dir(workdir))


@pytest.fixture(scope="module")
def clip_run(cross_case, tmp_path_factory):
    """A run conditioned on a frozen CLIP text encoder: the cross-attention run's EMA UNet and first stage (by
    first_stage.workdir) with conditioning kind=text, encoder=clip; its diffusion checkpoint holds the items
    sampling reads, and its text folders a tiny CLIP text encoder and tokenizer."""
    workdir = str(tmp_path_factory.mktemp("clip") / "run")
    items, config = restore(cross_case["workdir"], ("ema_params", "scale_factor", "step"))
    config.diffusion.first_stage.workdir = cross_case["workdir"]
    config.diffusion.conditioning.update(kind="text", mode="crossattn", encoder="clip", clip_output="last",
                                         max_length=77, embed_dim=64)
    state = {"step": items["step"], "scale_factor": items["scale_factor"],
             "ema_params": {"unet": items["ema_params"]["unet"], "cond": {}}}
    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), keep=1)
    try:
        checkpointer.save(0, state, {"config": config.to_json()})
    finally:
        checkpointer.close()
    write_clip_folders(workdir)
    return workdir


def test_missing_text_encoder_folder_is_named(clip_run, tmp_path, capsys):
    """The CLIP run's checkpoints without its text folders: refused, naming the missing folder."""
    bare = str(tmp_path / "bare")
    os.makedirs(os.path.join(bare, runs.DIFFUSION))
    os.symlink(runs.checkpoint_dir(clip_run, runs.DIFFUSION), runs.checkpoint_dir(bare, runs.DIFFUSION))
    shutil.copytree(runs.tokenizer_dir(clip_run), runs.tokenizer_dir(bare))
    with pytest.raises(SystemExit) as e:
        export_command.main(["--workdir", bare, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error:") and "Traceback" not in err
    assert f"but {runs.text_encoder_dir(bare)} is missing" in err and "CLIPTextModel folder" in err
    assert os.listdir(tmp_path) == ["bare"]  # neither --out nor a temporary folder


def test_clip_run_becomes_a_stable_diffusion_pipeline(clip_run, cross_case, tmp_path):
    """Into an existing empty --out: the CLIP folders copied byte for byte, and a StableDiffusionPipeline that loads
    with the exported UNet (its images equal the source pipeline's: tests/convert/test_sd_pipeline.py)."""
    out = tmp_path / "sd"
    out.mkdir()
    report = export(clip_run, str(out))
    assert report.pipeline == "StableDiffusionPipeline"
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    for name, source in (("text_encoder", runs.text_encoder_dir(clip_run)),
                         ("tokenizer", runs.tokenizer_dir(clip_run))):
        assert sorted(os.listdir(out / name)) == sorted(os.listdir(source))
        for file in os.listdir(source):
            assert (out / name / file).read_bytes() == open(os.path.join(source, file), "rb").read()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert same_tensors(pipe.unet, cross_case["ema_unet"]) and pipe.safety_checker is None


# -------------------------------------------------------------------------------------------------- refusals


def test_existing_out_is_refused_without_traceback(vq_case, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_command.main(["--workdir", vq_case["workdir"], "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "already exists and is not an empty folder" in err and "Traceback" not in err
    assert os.listdir(out) == ["keep.txt"]


def test_missing_run_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_command.main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no diffusion checkpoint" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")
