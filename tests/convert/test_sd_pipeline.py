"""Stable Diffusion through ``python -m lidiff.convert``: a tiny random diffusers ``StableDiffusionPipeline``
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer, DDIMScheduler with SD's settings) saved to a
folder, imported with the command, and sampled by ``sample.py`` with DDIM, 10 steps, guidance 7.5, from the
pipeline's initial latents: the float images of its ``ldm.generate`` call are the pipeline's within 1e-3, the
uint8 images it writes within one level. A CompVis SD v1 file of the same parts imports
to the same model; what lidiff cannot import (an SD v1 file without its tokenizer, SD v2's OpenCLIP layout, other
text encoders) is refused by name.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.numpy import save_file

from lidiff import runs
from lidiff.convert import __main__ as command
from lidiff.convert.diffusers_unet import diffusers_unet_to_compvis
from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis
from lidiff.data.text import tokenize
from lidiff.diffusion.schedule import make_beta_schedule
from lidiff.models.unet import UNetModel
from tests.clip_support import tiny_clip_text_model, tiny_clip_tokenizer
from tests.convert.test_diffusers_vae import randomize  # every parameter random, norm scales near 1

PROMPTS = ["the red cat", "a dog and 2 birds!"]  # characters of the tiny tokenizer's alphabet
MAX_LENGTH = 16  # the tokenizer's model_max_length (77 in Stable Diffusion) and the CLIP position count
LATENT = (8, 8, 4)  # latents [h, w, c]; the f=2 autoencoder decodes them to 16x16 images
RESOLUTION = 16
STEPS, GUIDANCE = 10, 7.5
SCALE = 0.5  # vae scaling_factor (SD: 0.18215)
# SD's DDIM settings: lidiff's steps arange(0, T, T // S) + 1 ending at alphas_cumprod[0]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
TOKENIZER_FLAG = "--config.diffusion.conditioning.tokenizer"
UNET_HEADS, CLIP_HEADS = 2, 2


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def pipe():
    """The reference pipeline, random weights, float32, eval mode."""
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = MAX_LENGTH
    text_encoder = tiny_clip_text_model(hidden=32, layers=2, heads=CLIP_HEADS, max_positions=MAX_LENGTH, seed=0)
    unet = randomize(UNet2DConditionModel(
        block_out_channels=(32,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32, attention_head_dim=UNET_HEADS,
        in_channels=4, out_channels=4, sample_size=LATENT[0], norm_num_groups=32), 1)
    vae = randomize(AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=RESOLUTION), 2)
    vae.register_to_config(scaling_factor=SCALE)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd") / "pipeline")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def x_T():
    """The initial latents [2, h, w, c] (NHWC; the pipeline takes them NCHW)."""
    return np.random.default_rng(0).normal(size=(len(PROMPTS),) + LATENT).astype(np.float32)


@pytest.fixture(scope="module")
def reference(pipe, x_T):
    """The pipeline's images [2, 16, 16, 3] float in [0, 1]; negative prompt the default ("")."""
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2))).images
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def imported(pipe_dir, tmp_path_factory):
    """(run directory, report) of the pipeline folder imported with the command."""
    workdir = str(tmp_path_factory.mktemp("run") / "sd")
    return workdir, command.run(["--src", pipe_dir, "--out", workdir, "--resolution", str(RESOLUTION)])


def run_sample_py(argv: list[str]) -> None:
    """``sample.py``'s main with ``argv`` in this process (its absl flags parsed, then reset)."""
    from absl import flags

    import sample

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sample.py", *argv])
    try:
        sample.main(["sample.py"])
    finally:
        flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def sampled(imported, x_T, tmp_path_factory):
    """sample.py on the imported run with --init_latents = the pipeline's x_T, DDIM, 10 steps, guidance 7.5 ->
    ``{"loaded": the LoadedLDM it sampled from, "kwargs": its ldm.generate call's keywords, "images": that call's
    float images [2, 16, 16, 3] in about [-1, 1], "written": samples.npz's uint8 images, "prompts"}``. Recording
    wrappers keep what sample.py's own calls returned; nothing else is changed."""
    import sample
    from lidiff.ldm import LatentDiffusion

    seen = {}
    load, generate = sample.load_latent_diffusion, LatentDiffusion.generate

    def loading(*args, **kwargs):
        seen["loaded"] = load(*args, **kwargs)
        return seen["loaded"]

    def generating(self, *args, **kwargs):
        seen["kwargs"], seen["images"] = kwargs, generate(self, *args, **kwargs)
        return seen["images"]

    folder = tmp_path_factory.mktemp("samples")
    np.save(folder / "x_T.npy", x_T)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "load_latent_diffusion", loading)
        patch.setattr(LatentDiffusion, "generate", generating)
        run_sample_py([f"--workdir={imported[0]}", f"--outdir={folder / 'out'}", f"--prompt={PROMPTS[0]}",
                       f"--prompt={PROMPTS[1]}", f"--init_latents={folder / 'x_T.npy'}", f"--steps={STEPS}",
                       f"--guidance_scale={GUIDANCE}", "--sampler=ddim"])
    with np.load(folder / "out" / "samples.npz") as data:
        seen["written"], seen["prompts"] = data["images"], data["prompts"].tolist()
    return seen


# -------------------------------------------------------------------------------------------- the pipeline


def test_sample_py_reproduces_the_pipeline(sampled, reference, x_T):
    """The float images of sample.py's ldm.generate call, mapped to [0, 1] as ``to_uint8`` does, are the
    pipeline's within 1e-3; the uint8 images it writes are the pipeline's (rounded) within one level."""
    kwargs = sampled["kwargs"]
    assert (kwargs["sampler"], kwargs["steps"], kwargs["guidance_scale"], kwargs["eta"]) == ("ddim", STEPS, GUIDANCE,
                                                                                              0.0)
    np.testing.assert_array_equal(kwargs["x_T"], x_T)
    ours = np.clip((np.asarray(sampled["images"]) + 1.0) / 2.0, 0.0, 1.0)
    assert ours.shape == reference.shape == (len(PROMPTS), RESOLUTION, RESOLUTION, 3)
    assert reference.std() > 0.05 and ((reference > 0) & (reference < 1)).mean() > 0.5  # not saturated
    assert np.abs(reference[0] - reference[1]).max() > 0.1  # the prompts matter
    err = np.abs(ours - reference).max()
    assert err < 1e-3, err
    assert sampled["prompts"] == PROMPTS and sampled["written"].dtype == np.uint8
    want = np.round(reference * 255).astype(np.int32)
    assert np.abs(sampled["written"].astype(np.int32) - want).max() <= 1


def test_pipeline_import_writes_a_clip_text_model(imported, sampled, pipe_dir):
    workdir, report = imported
    loaded = sampled["loaded"]
    c = loaded.config.diffusion.conditioning
    assert (c.kind, c.mode, c.encoder, c.clip_output, c.embed_dim, c.max_length) == (
        "text", "crossattn", "clip", "last", 32, MAX_LENGTH)
    assert c.text_encoder == os.path.join(pipe_dir, "text_encoder") and c.tokenizer == os.path.join(pipe_dir,
                                                                                                     "tokenizer")
    assert sorted(os.listdir(runs.text_encoder_dir(workdir))) == sorted(os.listdir(c.text_encoder))
    assert os.path.isdir(runs.tokenizer_dir(workdir))
    assert float(loaded.scale_factor) == SCALE
    process = loaded.config.diffusion.process
    assert (process.schedule, process.linear_start, process.linear_end, process.parameterization) == (
        "scaled_linear", 0.00085, 0.012, "eps")
    assert loaded.params["cond"] and loaded.config.diffusion.model.num_heads == UNET_HEADS
    text = "\n".join(report.lines)
    for line in ("scale_factor: 0.5 (from vae/config.json scaling_factor)",
                 "(from scheduler/scheduler_config.json)",
                 "sampling: lidiff's DDIM / PLMS steps are DDIMScheduler's",
                 f"frozen CLIPTextModel from {c.text_encoder}: 2 layers, width 32, {CLIP_HEADS} heads",
                 f"max_length {MAX_LENGTH} (from the tokenizer's model_max_length)",
                 "ignored: safety_checker (null in model_index.json)",
                 "ignored: feature_extractor (null in model_index.json)",
                 f"wrote {runs.text_encoder_dir(workdir)}: a copy of {c.text_encoder}"):
        assert line in text, (line, text)


# ------------------------------------------------------------------------------------- CompVis SD v1 file


def compvis_sd_file(pipe, model, path: str) -> dict[str, np.ndarray]:
    """The pipeline's parts in a CompVis SD v1 single file (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.text_model.* with the position_ids buffer SD v1 files carry, schedule buffers);
    returns it."""
    sd = {"model.diffusion_model." + k: np.asarray(v)
          for k, v in diffusers_unet_to_compvis(pipe.unet.state_dict(), model).items()}
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(pipe.vae.state_dict()).items()})
    sd.update({"cond_stage_model.transformer.text_model." + k: v.numpy()
               for k, v in pipe.text_encoder.state_dict().items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(MAX_LENGTH)[None]
    betas = make_beta_schedule("scaled_linear", 1000, SCHEDULER["beta_start"], SCHEDULER["beta_end"])
    sd.update(betas=betas.astype(np.float32), alphas_cumprod=np.cumprod(1.0 - betas).astype(np.float32))
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    save_file(sd, path)
    return sd


@pytest.fixture(scope="module")
def compvis_file(pipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd_v1") / "sd-v1.safetensors")
    model = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(1,), num_heads=UNET_HEADS, use_spatial_transformer=True, context_dim=32)
    compvis_sd_file(pipe, model, path)
    return path


def _restore(workdir: str, stage: str, names: tuple[str, ...]) -> dict:
    """Items ``names`` of the run's ``stage`` checkpoint, as saved (nested numpy)."""
    from lidiff.checkpoint import Checkpointer

    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, stage), create=False)
    try:
        return checkpointer.restore_items(names=names)[0]
    finally:
        checkpointer.close()


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_compvis_sd_v1_file_imports_the_same_model(pipe, pipe_dir, imported, sampled, compvis_file, tmp_path):
    """The SD v1 file route (UNet heads and the tokenizer given as flags) writes a transformers CLIPTextModel
    folder equal to the pipeline's text encoder, and a run with the diffusers route's config and weights (UNet,
    autoencoder: equal tensors, so equal outputs); its context equals PyTorch's."""
    from transformers import CLIPTextModel

    from lidiff.convert.clip import load_clip_text_encoder

    loaded = sampled["loaded"]
    workdir = str(tmp_path / "run")
    report = command.run(["--src", compvis_file, "--out", workdir, "--resolution", str(RESOLUTION),
                          f"--config.diffusion.model.num_heads={UNET_HEADS}",
                          f"--config.diffusion.conditioning.heads={CLIP_HEADS}",
                          f"{TOKENIZER_FLAG}={os.path.join(pipe_dir, 'tokenizer')}",
                          f"--config.diffusion.first_stage.scale_factor={SCALE}"])
    config = runs.saved_config(workdir)
    for section in ("model", "conditioning", "process", "first_stage"):
        want, got = loaded.config.diffusion[section].to_dict(), config.diffusion[section].to_dict()
        if section == "conditioning":  # the file's text encoder lives in the run, the pipeline's in its folder
            assert got.pop("text_encoder") == os.path.abspath(runs.text_encoder_dir(workdir))
            assert got.pop("tokenizer") == want.pop("tokenizer") != want.pop("text_encoder")
        assert got == want, section
    assert config.autoencoder.model.to_dict() == loaded.config.autoencoder.model.to_dict()
    text = "\n".join(report.lines)
    assert "ignored: cond_stage_model.transformer.text_model.embeddings.position_ids (a buffer" in text
    assert "a transformers CLIPTextModel folder (config.json, model.safetensors) from the file's tensors" in text
    assert f"{CLIP_HEADS} heads (--config.diffusion.conditioning.heads)" in text

    for stage, names in ((runs.DIFFUSION, ("params", "ema_params")), (runs.AUTOENCODER, ("params",))):
        ours, theirs = _restore(workdir, stage, names), _restore(imported[0], stage, names)
        for name in names:
            assert _same(ours[name], theirs[name]), (stage, name)

    # the written folder: a transformers CLIPTextModel equal to the pipeline's, read by lidiff to the same context
    folder = runs.text_encoder_dir(workdir)
    ids = tokenize(loaded.tokenizer, PROMPTS, MAX_LENGTH)
    with torch.no_grad():
        want = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
        reread = CLIPTextModel.from_pretrained(folder)(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
    np.testing.assert_array_equal(reread.numpy(), want)
    _, clip_params = load_clip_text_encoder(folder)
    assert _same(clip_params, loaded.params["cond"])
    encode = jax.jit(lambda params, tokens: loaded.ldm.encode_condition({"cond": params}, {"tokens": tokens}))
    context = np.asarray(encode(clip_params, ids)["context"])
    assert rel(context, want) < 1e-5, rel(context, want)


# ------------------------------------------------------------------------------------------------ refusals


def assert_refused(argv, capsys, *needles) -> str:
    """The command exits with status 1 and one message holding every needle, no traceback."""
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_compvis_sd_v1_file_without_tokenizer_is_refused(compvis_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(["--src", compvis_file, "--out", str(out), f"--config.diffusion.model.num_heads={UNET_HEADS}",
                    f"--config.diffusion.conditioning.heads={CLIP_HEADS}"], capsys, f"{TOKENIZER_FLAG}=<folder>",
                   "no tokenizer")
    assert not out.exists()


def test_sd_v2_stability_layout_is_refused(tmp_path, capsys):
    path = str(tmp_path / "sd2.safetensors")
    save_file({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32),
               "cond_stage_model.model.token_embedding.weight": np.zeros((8, 4), np.float32)}, path)
    assert_refused(["--src", path, "--out", str(tmp_path / "run")], capsys, "cond_stage_model.model.*",
                   "Import the diffusers folder of the same model")


@pytest.mark.parametrize("change, needles", [
    ({"text_encoder": ["transformers", "T5EncoderModel"]}, ["'text_encoder' is a T5EncoderModel", "CLIPTextModel"]),
    ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
      "tokenizer_2": ["transformers", "CLIPTokenizer"]},
     ["'text_encoder_2' (CLIPTextModelWithProjection)", "'tokenizer_2' (CLIPTokenizer)"]),
])
def test_pipelines_with_other_text_encoders_are_refused(pipe_dir, tmp_path, capsys, change, needles):
    """Only model_index.json is read before the refusal."""
    with open(os.path.join(pipe_dir, "model_index.json")) as f:
        index = json.load(f)
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**index, **change}))
    assert_refused(["--src", str(folder), "--out", str(tmp_path / "run")], capsys, *needles)


SD_CONFIG = '''
import importlib.util

spec = importlib.util.spec_from_file_location("base", {base!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)


def get_config():
    unet = base.unet_model(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                           attention_resolutions=(1,), use_spatial_transformer=True, context_dim=32)
    diffusion = base.diffusion_stage(unet, batch_size=8, learning_rate=1e-4)
    diffusion.conditioning = base.conditioning("text", encoder="clip", embed_dim=32, max_length={length})
    ae = base.autoencoder_model("kl", ch_mult=(1, 2), z_channels=4, embed_dim=4, attn_resolutions=(), ch=32,
                                num_res_blocks=1, resolution={resolution})
    return base.experiment(("autoencoder", "diffusion"), base.data_config("synthetic", resolution={resolution}),
                           base.autoencoder_stage(ae, base.autoencoder_loss(), 8, 1e-4), diffusion)
'''


def test_config_file_with_another_head_layout_is_refused(pipe_dir, tmp_path, capsys):
    """A diffusers UNet's config.json fixes its heads: a --config whose layout differs (base's 32 channels per
    head: 1 head of 32, not the pipeline's 2 of 16) is refused, naming the width and both layouts."""
    base_py = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "base.py")
    config_file = tmp_path / "sd_tiny.py"
    config_file.write_text(SD_CONFIG.format(base=os.path.abspath(base_py), length=MAX_LENGTH, resolution=RESOLUTION))
    assert_refused(["--src", pipe_dir, "--out", str(tmp_path / "run"), "--config", str(config_file)], capsys,
                   "attention heads at width 32: checkpoint 2 x 16, config 1 x 32")
    assert not (tmp_path / "run").exists()


def test_exported_run_is_the_pipeline_again(imported, reference, x_T, tmp_path):
    """``python -m lidiff.export`` of the imported run loads back as a StableDiffusionPipeline that draws the
    reference images from the same latents (and holds the same tokenizer)."""
    from lidiff.export import __main__ as export_command

    out = str(tmp_path / "exported")
    report = export_command.run(["--workdir", imported[0], "--out", out])
    assert report.pipeline == "StableDiffusionPipeline"
    again = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert again.tokenizer(PROMPTS).input_ids == tiny_clip_tokenizer()(PROMPTS).input_ids
    with torch.no_grad():
        images = again(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                       latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2))).images
    assert np.abs(np.asarray(images, np.float32) - reference).max() < 1e-5
