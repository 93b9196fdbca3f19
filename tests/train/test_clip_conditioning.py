"""Stage 2 conditioned on a frozen pretrained CLIP text encoder (Stable Diffusion's), trained end to end.

A tiny random ``CLIPTextModel`` and CLIP tokenizer (``tests.clip_support``) condition a one-level UNet on the
captions of 8 images, over a random KL first stage (32x32 -> 8x8x2), for 2 steps with ``p_uncond`` 0.5 from the
latent cache, which holds the CLIP outputs (``latent_cache.text_embeddings``). Checked:

- the CLIP weights are never trained: the train state's ``params["cond"]`` is empty and the optimizer state
  covers the UNet alone; the run directory holds a copy of the encoder and tokenizer folders;
- the cached embeddings equal transformers' PyTorch ``CLIPTextModel`` on the cached tokens;
- a train step on the cached outputs gives the loss it gives on the tokens (CLIP run in the step): rows are
  dropped to the empty prompt's embedding exactly where the token path drops the tokens;
- sampling loads the frozen encoder from the run directory;
- the config refusals.
"""

import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from configs import base
from lidiff.convert.clip import load_clip_text_encoder
from lidiff.data.text import load_clip_tokenizer
from lidiff.errors import ConfigError
from lidiff.runs import latent_cache_path, load_latent_diffusion, text_encoder_dir, tokenizer_dir
from lidiff.train.conditioning import check_conditioning
from lidiff.train.diffusion import conditioning_inputs, train_diffusion
from stage2_support import randomized_kernels, train_recorded, write_random_first_stage
from tests.clip_support import tiny_clip_text_model, write_tiny_clip_text_encoder, write_tiny_clip_tokenizer

RES, BATCH, LATENT_CH, WIDTH, MAX_LEN = 32, 8, 2, 32, 12
CAPTIONS = ("a red square", "the blue disc", "red and green", "a green line", "the red dot", "blue and red",
            "a small square", "the big disc")


def config(fs_workdir: str, data_dir: str, clip_dir: str, tok_dir: str, *, text_embeddings: bool):
    unet = base.unet_model(in_channels=LATENT_CH, out_channels=LATENT_CH, model_channels=32, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(), num_heads=2, num_head_channels=-1,
                           legacy=False, use_spatial_transformer=True, context_dim=WIDTH, use_scale_shift_norm=True)
    d = base.diffusion_stage(unet, batch_size=BATCH, learning_rate=1e-3)
    d.conditioning = base.conditioning("text", encoder="clip", text_encoder=clip_dir, tokenizer=tok_dir,
                                       embed_dim=WIDTH, max_length=MAX_LEN, p_uncond=0.5)
    d.first_stage.workdir = fs_workdir
    d.first_stage.scale_factor = 0.5
    d.latent_cache.enabled = True
    d.latent_cache.text_embeddings = text_embeddings
    d.train.update(dict(num_steps=2, log_every=1, sample_every=0, checkpoint_every=2))
    d.sample.update(dict(prompts=CAPTIONS[:2], final_samples_per_class=0))
    ae_model = base.autoencoder_model("kl", ch_mult=(1, 1, 1), z_channels=LATENT_CH, embed_dim=LATENT_CH, ch=32,
                                      num_res_blocks=1, resolution=RES)
    ae = base.autoencoder_stage(ae_model, base.autoencoder_loss(perceptual_weight=0.0, disc_num_layers=1,
                                                                disc_ndf=8), batch_size=BATCH, learning_rate=1e-3)
    data = base.data_config("captioned_folder", resolution=RES, path=data_dir, num_threads=0)
    return base.experiment(("diffusion",), data, ae, d, seed=0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_parts")
    rng = np.random.default_rng(0)
    data = root / "images"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    clip_dir = write_tiny_clip_text_encoder(str(root / "text_encoder"), hidden=WIDTH)
    tok_dir = write_tiny_clip_tokenizer(str(root / "tokenizer"))
    fs = write_random_first_stage(str(root / "stage1"), config("", str(data), clip_dir, tok_dir,
                                                               text_embeddings=False), RES)
    return dict(fs=fs, data=str(data), clip=clip_dir, tok=tok_dir)


@pytest.fixture(scope="module")
def run(parts, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("clip_run"))
    cfg = config(parts["fs"], parts["data"], parts["clip"], parts["tok"], text_embeddings=True)
    return train_recorded("text", cfg, workdir)


def count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_clip_weights_stay_out_of_the_train_state(run):
    state = run.state
    assert int(state.step) == 2
    assert state.params["cond"] == {} and state.ema_params["cond"] == {}
    assert count(state.opt_state) <= 2 * count(state.params["unet"]) + 8  # Adam's moments of the UNet, counters
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), state.params,
                         state.ema_params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the UNet did train
    assert os.path.isfile(os.path.join(text_encoder_dir(run.workdir), "model.safetensors"))
    assert len(load_clip_tokenizer(tokenizer_dir(run.workdir))) == len(load_clip_tokenizer(
        run.config.diffusion.conditioning.tokenizer))


def test_cached_embeddings_equal_pytorch_clip(run):
    cache = np.load(latent_cache_path(run.workdir))
    tokens, cached = cache["tokens"], cache["text_embedding"]
    assert cached.shape == (len(CAPTIONS), MAX_LEN, WIDTH)
    with torch.no_grad():
        ref = tiny_clip_text_model(hidden=WIDTH)(torch.from_numpy(tokens.astype(np.int64))).last_hidden_state.numpy()
    assert np.abs(cached - ref).max() / np.abs(ref).max() < 1e-5


def test_a_step_on_cached_embeddings_equals_a_step_on_tokens(run):
    """``train_step`` on the cached CLIP outputs gives the loss it gives on the tokens (which it encodes with the
    frozen CLIP), rows dropped to the empty prompt with p_uncond 0.5 included; with the UNet's zero-initialised
    kernels drawn at random the loss depends on the context, so shuffled embeddings give another loss."""
    loaded = load_latent_diffusion(run.workdir)
    ldm, clip_params = loaded.ldm, loaded.params["cond"]
    cache = dict(np.load(latent_cache_path(run.workdir)))
    state = run.state.replace(params=randomized_kernels(run.state.params))
    step = jax.jit(loaded.trainer.train_step)
    latents = {k: cache[k] for k in ("mean", "logvar")}

    def loss(text: dict) -> float:
        return float(step(state, {**latents, **text}, loaded.first_stage_params, clip_params)[1]["loss"])

    from_tokens = loss({"tokens": cache["tokens"]})
    from_cache = loss({"text_embedding": cache["text_embedding"]})
    shuffled = loss({"text_embedding": cache["text_embedding"][::-1]})
    assert abs(from_tokens - from_cache) <= 1e-5 * abs(from_tokens), (from_tokens, from_cache)
    assert abs(shuffled - from_cache) > 1e-4 * abs(from_cache), (from_tokens, from_cache, shuffled)
    # the step's key drops some rows and keeps others, so both paths of the cached branch are compared
    rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(run.config.seed), int(state.step)), 4)[3]
    inputs = conditioning_inputs(ldm, {"tokens": cache["tokens"]}, 0.5, rng, encoder_params=clip_params)
    dropped = np.all(np.asarray(inputs["tokens"]) == np.asarray(ldm.null_inputs(1)["tokens"]), axis=1)
    assert 0 < dropped.sum() < len(CAPTIONS)


def test_sampling_loads_the_frozen_encoder(run, parts):
    loaded = load_latent_diffusion(run.workdir)
    assert loaded.ldm.frozen_encoder
    _, clip_params = load_clip_text_encoder(parts["clip"])
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), loaded.params["cond"],
                        clip_params)
    assert all(jax.tree.leaves(same))
    assert count(loaded.params["unet"]) == count(run.state.params["unet"])


def test_config_refusals(parts, tmp_path):
    good = config(parts["fs"], parts["data"], parts["clip"], parts["tok"], text_embeddings=False)
    wrong = good.diffusion.conditioning
    wrong.update(dict(encoder="t5"))
    with pytest.raises(ConfigError, match="encoder='t5'"):
        check_conditioning(wrong, good.diffusion.model)
    cfg = config(parts["fs"], parts["data"], parts["clip"], parts["tok"], text_embeddings=True)
    cfg.diffusion.latent_cache.enabled = False
    with pytest.raises(ConfigError, match="latent_cache.enabled=True"):
        train_diffusion(cfg, str(tmp_path / "a"))
    cfg = config(parts["fs"], parts["data"], parts["clip"], parts["tok"], text_embeddings=False)
    cfg.diffusion.conditioning.embed_dim = cfg.diffusion.model.context_dim = 16
    with pytest.raises(ConfigError, match=f"CLIP text encoder is {WIDTH} wide"):
        train_diffusion(cfg, str(tmp_path / "b"))
