"""Stage 2 with every conditioning kind, end to end: class labels in ``adm`` mode, captions (text) and digit layouts.

Each kind trains once (``train_diffusion``, 2 steps, global batch 8 over the 8 forced CPU devices) on one tiny setup:
a random KL first stage saved as a stage-1 checkpoint (32x32 RGB -> 8x8x2 latents, f4), a one-level 32-channel
UNet, and for text / layout a one-block transformer of width 16. The UNet uses ``use_scale_shift_norm``: with 32
channels every GroupNorm(32) group is a single channel, so an embedding merely added before the norm (the
default) would be normalised away, and neither the timestep nor an ``adm`` label could change the output.
Then, from the run directory:

- sampling (``lidiff.runs.load_latent_diffusion`` + ``LatentDiffusion.generate``): finite images of the right shape;
  with the zero-initialised kernels randomised, rows whose conditioning differs differ, rows whose conditioning
  and noise agree are equal, guidance 3 differs from guidance 1, and guidance changes nothing on the null input;
- the text run: its WordPiece tokenizer in ``<workdir>/diffusion/tokenizer``, the two uncaptioned images skipped
  and counted, the latent cache holding each caption's token ids;
- ``p_uncond``: ``conditioning_inputs`` replaces exactly the dropped rows of a real batch by the encoder's null
  input, with the dropped rows ``uniform(rng, (B,)) < p``;
- ``sample.py`` on the text and layout runs (prompts / layouts recorded in samples.npz), and its refusals;
- the config refusals of ``check_conditioning``.

The class ``crossattn`` mode is covered by tests/train/test_diffusion_trainer.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import base
from lidiff.checkpoint import Checkpointer
from lidiff.data.captions import CaptionedFolderSource
from lidiff.data.layouts import read_layout_file
from lidiff.data.latents import CachedLatentLoader
from lidiff.data.pipeline import epoch_permutation
from lidiff.data.text import load_tokenizer, null_tokens, tokenize
from lidiff.errors import ConfigError
from lidiff.runs import latent_cache_path, load_latent_diffusion, tokenizer_dir
from lidiff.train.common import make_loader
from lidiff.train.conditioning import check_conditioning
from lidiff.train.diffusion import conditioning_inputs, data_fields, train_diffusion
from stage2_support import randomized_kernels, train_recorded, write_random_first_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES, BATCH, LATENT_CH, EMBED = 32, 8, 2, 16
LATENT_SHAPE = (RES // 4, RES // 4, LATENT_CH)  # f4 first stage
CLASSES, DIGIT_CLASSES, MAX_BOXES, MAX_LEN, LAYOUT_VOCAB = 3, 10, 3, 16, 1000
NUM_STEPS, SAMPLE_STEPS, NUM_EXAMPLES = 2, 2, 16
PROMPTS = ("a red square", "a blue circle")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")
UNCAPTIONED = (5, 11)  # image indices written without a caption file


# ---------------------------------------------------------------------------------------------------- configs


def autoencoder_stage() -> ConfigDict:
    model = base.autoencoder_model("kl", ch_mult=(1, 1, 1), z_channels=LATENT_CH, embed_dim=LATENT_CH, ch=32,
                                   num_res_blocks=1, resolution=RES)
    loss = base.autoencoder_loss(perceptual_weight=0.0, disc_num_layers=1, disc_ndf=8)
    return base.autoencoder_stage(model, loss, batch_size=BATCH, learning_rate=1e-3)


def stage2_config(kind: str, data: ConfigDict, fs_workdir: str = "", *, mode: str = "crossattn",
                  cache: bool = False, p_uncond: float = 0.2) -> ConfigDict:
    """The tiny experiment of ``kind`` (class / text / layout) on ``data`` (see the module docstring)."""
    cross = not (kind == "class" and mode == "adm")
    concat = DIGIT_CLASSES if mode == "hybrid" else 0  # hybrid layouts add one box-map channel per class
    unet = base.unet_model(in_channels=LATENT_CH + concat, out_channels=LATENT_CH, model_channels=32, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(), num_heads=2, num_head_channels=-1,
                           legacy=False, use_spatial_transformer=cross, context_dim=EMBED if cross else 0,
                           use_scale_shift_norm=True)
    d = base.diffusion_stage(unet, batch_size=BATCH, learning_rate=1e-3)
    d.conditioning = base.conditioning(kind, mode=mode, embed_dim=EMBED, p_uncond=p_uncond, n_layer=1, heads=2,
                                       dim_head=8)
    if kind == "class":
        d.conditioning.num_classes = CLASSES
    elif kind == "text":
        d.conditioning.update(dict(build_vocab=True, max_length=MAX_LEN))
        d.sample.prompts = PROMPTS
    elif kind == "layout":
        d.conditioning.update(dict(num_classes=DIGIT_CLASSES, max_boxes=MAX_BOXES, vocab_size=LAYOUT_VOCAB))
    d.first_stage.workdir = fs_workdir
    d.first_stage.scale_by_std = True
    d.latent_cache.enabled = cache
    d.train.update(dict(num_steps=NUM_STEPS, log_every=1, sample_every=0, checkpoint_every=NUM_STEPS,
                        keep_checkpoints=2))
    d.sample.update(dict(steps=SAMPLE_STEPS, guidance_scale=2.0, num_images=BATCH, final_samples_per_class=0))
    return base.experiment(("diffusion",), data, autoencoder_stage(), d, seed=0)


def class_data() -> ConfigDict:
    return base.data_config("synthetic", resolution=RES, num_examples=NUM_EXAMPLES, num_classes=CLASSES,
                            num_threads=0)


def text_data(path: str) -> ConfigDict:
    return base.data_config("captioned_folder", resolution=RES, path=path, num_threads=0)


def layout_data() -> ConfigDict:
    return base.data_config("digits_layout", resolution=RES, num_examples=NUM_EXAMPLES, max_boxes=MAX_BOXES,
                            num_threads=0)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fs_workdir(tmp_path_factory):
    """A stage-1 workdir holding a tiny random KL autoencoder checkpoint."""
    return write_random_first_stage(str(tmp_path_factory.mktemp("stage1")),
                                    stage2_config("class", class_data(), mode="adm"), RES)


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    """16 PNGs (a coloured square or disc on grey, 40x36 so the loader resizes and crops), each with a sidecar
    caption naming colour and shape, except images ``UNCAPTIONED``."""
    root = tmp_path_factory.mktemp("captioned")
    yy, xx = np.mgrid[:36, :40]
    for i in range(NUM_EXAMPLES):
        color_name = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % 2]
        image = np.full((36, 40, 3), 128, np.uint8)
        cx, cy, r = 12 + i, 18, 9
        inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r) if shape == "square" else \
            (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[inside] = COLORS[color_name]
        Image.fromarray(image).save(root / f"img_{i:02d}.png")
        if i not in UNCAPTIONED:
            (root / f"img_{i:02d}.txt").write_text(f"  a {color_name} {shape} number {i}\n")
    return str(root)


_train = train_recorded


@pytest.fixture(scope="module")
def adm_run(fs_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("adm") / "run")
    return _train("class", stage2_config("class", class_data(), fs_workdir, mode="adm"), workdir)


@pytest.fixture(scope="module")
def text_run(fs_workdir, caption_dir, tmp_path_factory):
    """The text run trains from the latent cache (built once from the captioned folder)."""
    workdir = str(tmp_path_factory.mktemp("text") / "run")
    return _train("text", stage2_config("text", text_data(caption_dir), fs_workdir, cache=True), workdir)


@pytest.fixture(scope="module")
def layout_run(fs_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("layout") / "run")
    return _train("layout", stage2_config("layout", layout_data(), fs_workdir, mode="hybrid"), workdir)


@pytest.fixture(scope="module")
def runs(adm_run, text_run, layout_run):
    return {"adm": adm_run, "text": text_run, "layout": layout_run}


_LOADED = {}


def loaded(run):
    """``load_latent_diffusion`` of a run directory (once per run)."""
    if run.workdir not in _LOADED:
        _LOADED[run.workdir] = load_latent_diffusion(run.workdir)
    return _LOADED[run.workdir]


@pytest.fixture(scope="module", autouse=True)
def _forget_loaded():
    yield
    _LOADED.clear()


def rows(inputs: dict, index) -> dict:
    return {k: np.asarray(v)[np.asarray(index)] for k, v in inputs.items()}


def two_conditionings(run, model) -> dict:
    """Two distinct raw inputs (rows 0 and 1) for the run's encoder, as sample.py would give them."""
    if run.kind == "class":
        return {"label": np.asarray([0, 2], np.int32)}
    if run.kind == "text":
        return {"tokens": tokenize(model.tokenizer, ["a red square", "a blue circle"], MAX_LEN)}
    boxes = np.zeros((2, MAX_BOXES, 4), np.float32)
    labels = np.full((2, MAX_BOXES), -1, np.int32)
    boxes[0, 0], labels[0, 0] = (0.1, 0.1, 0.6, 0.6), 3
    boxes[1, :2], labels[1, :2] = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], [1, 7]
    return {"boxes": boxes, "box_labels": labels}


# ---------------------------------------------------------------------------------------- training + sampling


@pytest.mark.parametrize("name", ["adm", "text", "layout"])
def test_trains_saves_and_samples_by_conditioning(runs, name):
    run = runs[name]
    assert int(run.state.step) == NUM_STEPS
    checkpointer = Checkpointer(os.path.join(run.workdir, "diffusion", "checkpoints"), create=False)
    try:
        assert checkpointer.latest_step() == NUM_STEPS
        saved = ConfigDict(json.loads(checkpointer.restore_meta(NUM_STEPS)["config"]))
    finally:
        checkpointer.close()
    assert saved.diffusion.conditioning.kind == run.kind
    assert saved.diffusion.conditioning.mode == {"adm": "adm", "text": "crossattn", "layout": "hybrid"}[name]

    model = loaded(run)
    assert model.step == NUM_STEPS and model.ldm.conditioner.kind == run.kind
    # the restored params are the run's EMA params
    for a, b in zip(jax.tree.leaves(jax.device_get(model.params)), jax.tree.leaves(run.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    if name == "adm":  # labels reach the UNet's label_emb (classes + the null class), not a context
        assert model.params["unet"]["label_emb"]["embedding"].shape[0] == CLASSES + 1
        assert model.params["cond"] == {}
    if name == "layout":  # hybrid: the UNet's first convolution reads the latent and one box map per digit class
        assert model.params["unet"]["input_blocks_0_0"]["kernel"].shape[2] == LATENT_CH + DIGIT_CLASSES

    pair = two_conditionings(run, model)
    mixed = rows(pair, [0, 1] * (BATCH // 2))  # rows alternate the two conditionings
    same = rows(pair, [0] * BATCH)  # ... or all take the first
    null = {k: np.asarray(v) for k, v in model.ldm.null_inputs(BATCH).items()}

    def generate(params, inputs, guidance):
        return model.ldm.generate(params, model.first_stage_params, model.scale_factor, jax.random.PRNGKey(7),
                                  num=BATCH, latent_shape=LATENT_SHAPE, inputs=inputs, sampler="ddim",
                                  steps=SAMPLE_STEPS, guidance_scale=guidance)

    trained = generate(model.params, mixed, 3.0)
    assert trained.shape == (BATCH, RES, RES, 3) and trained.dtype == np.float32
    assert np.isfinite(trained).all()

    params = randomized_kernels(model.params)
    x_mixed, x_same = generate(params, mixed, 1.0), generate(params, same, 1.0)
    assert np.isfinite(x_mixed).all() and np.isfinite(x_same).all()
    # same noise (same rng, same row) and same conditioning: the same image (to float rounding, 1e-5); other
    # conditioning: another image, in every such row (by 100x that rounding at least)
    np.testing.assert_allclose(x_mixed[0::2], x_same[0::2], atol=1e-5)
    assert np.abs(x_mixed[1::2] - x_same[1::2]).reshape(BATCH // 2, -1).max(axis=1).min() > 1e-3
    # guidance pushes away from the unconditional (null-input) prediction ...
    x_guided = generate(params, mixed, 3.0)
    assert np.isfinite(x_guided).all()
    assert np.abs(x_guided - x_mixed).reshape(BATCH, -1).max(axis=1).min() > 1e-3
    # ... and is a no-op when the conditioning is the null input itself: the unconditional branch is the null input
    np.testing.assert_allclose(generate(params, null, 3.0), generate(params, null, 1.0), atol=1e-4)


# ------------------------------------------------------------------------------------------------- text data


def test_text_run_tokenizer_skipped_images_and_cache(text_run, caption_dir):
    config = text_run.config
    tok_dir = tokenizer_dir(text_run.workdir)
    assert os.path.isfile(os.path.join(tok_dir, "vocab.txt"))
    tokenizer = load_tokenizer(tok_dir)
    assert len(tokenizer) <= 1000
    vocab = tokenizer.get_vocab()
    for word in ("red", "blue", "square", "circle"):  # trained on the captions: whole words, no [UNK]
        assert word in vocab, word
    assert loaded(text_run).tokenizer.get_vocab() == vocab  # sampling reads the run's copy

    source = CaptionedFolderSource(caption_dir)
    assert len(source) == NUM_EXAMPLES
    captions = [source.caption(i) for i in range(len(source))]
    assert [i for i, c in enumerate(captions) if c is None] == list(UNCAPTIONED)

    # the latent cache: one row per image, holding the caption's token ids (an uncaptioned image's row repeats
    # the previous usable example, image and tokens alike)
    with np.load(latent_cache_path(text_run.workdir)) as cache:
        assert cache["_fields"].tolist() == ["tokens"]
        tokens, mean = cache["tokens"], cache["mean"]
    assert tokens.shape == (NUM_EXAMPLES, MAX_LEN) and tokens.dtype == np.int32
    assert mean.shape == (NUM_EXAMPLES,) + LATENT_SHAPE
    expected = tokenize(tokenizer, [c for c in captions if c is not None], MAX_LEN)
    np.testing.assert_array_equal(tokens[[i for i, c in enumerate(captions) if c is not None]], expected)
    for i in UNCAPTIONED:
        np.testing.assert_array_equal(tokens[i], tokens[i - 1])
        np.testing.assert_array_equal(mean[i], mean[i - 1])
    assert not (tokens == null_tokens(tokenizer, MAX_LEN)).all(axis=1).any()  # no row is the empty prompt
    skipped = [m for m in text_run.warnings if m.startswith("latent cache: example") and "unusable" in m]
    assert len(skipped) == len(UNCAPTIONED)
    for i in UNCAPTIONED:
        assert sum(source.describe(i) in m for m in skipped) == 1

    # training from images (no cache): the loader skips the uncaptioned images and counts each bad read; a
    # position holding one moves on to the next in the stream order, which is permutation(seed, epoch)
    loader = make_loader(config.data, BATCH, config.seed, fields=data_fields(config, tokenizer))
    try:
        batches = [loader.batch_at(step) for step in range(NUM_EXAMPLES // BATCH)]  # one epoch
        num_skipped = loader.num_skipped
    finally:
        loader.close()
    stream = np.concatenate([epoch_permutation(config.seed, e, NUM_EXAMPLES) for e in range(2)])
    expected_skips = 0
    for p in range(NUM_EXAMPLES):
        while stream[p] in UNCAPTIONED:
            expected_skips, p = expected_skips + 1, p + 1
    assert num_skipped == expected_skips >= len(UNCAPTIONED)
    for row in np.concatenate([b["tokens"] for b in batches]):  # every row is a captioned image's caption
        assert (expected == row).all(axis=1).any()


# --------------------------------------------------------------------------------------------------- p_uncond


def _batch(run):
    """A real training batch of the run's raw conditioning inputs (from the cache for the text run)."""
    if run.config.diffusion.latent_cache.enabled:
        return CachedLatentLoader(latent_cache_path(run.workdir), global_batch_size=BATCH).batch_at(0)
    tokenizer = loaded(run).tokenizer
    loader = make_loader(run.config.data, BATCH, run.config.seed, fields=data_fields(run.config, tokenizer))
    try:
        return loader.batch_at(0)
    finally:
        loader.close()


def _is_null(inputs, null_row) -> np.ndarray:
    """[B] bool: rows equal to the encoder's null input in every key."""
    out = None
    for k, v in inputs.items():
        v = np.asarray(v)
        eq = (v == np.asarray(null_row[k])[None]).reshape(len(v), -1).all(axis=1)
        out = eq if out is None else out & eq
    return out


@pytest.mark.parametrize("name", ["adm", "text", "layout"])
def test_p_uncond_replaces_exactly_the_dropped_rows_by_the_null_input(runs, name):
    run = runs[name]
    model = loaded(run)
    ldm = model.ldm
    batch = _batch(run)
    keys = {"adm": ["label"], "text": ["tokens"], "layout": ["boxes", "box_labels"]}[name]
    assert sorted(ldm.conditioner.input_specs) == sorted(keys)
    inputs = {k: np.asarray(batch[k]) for k in keys}
    null_row = {k: np.asarray(v)[0] for k, v in ldm.null_inputs(1).items()}
    # the encoders' null inputs, as documented
    if name == "adm":
        assert null_row["label"] == CLASSES
    elif name == "text":
        np.testing.assert_array_equal(null_row["tokens"], null_tokens(model.tokenizer, MAX_LEN))
        assert null_row["tokens"][0] != null_row["tokens"][2]  # [CLS] [SEP] [PAD] ...: not all padding
    else:
        assert (null_row["box_labels"] == -1).all() and (null_row["boxes"] == 0).all()
        assert (inputs["box_labels"] >= 0).any(axis=1).all()  # every digit layout has a box
    assert not _is_null(inputs, null_row).any()  # so a dropped row is visible
    assert len(np.unique(np.asarray(inputs[keys[-1]]).reshape(BATCH, -1), axis=0)) > 1

    rng = jax.random.PRNGKey(3)
    for p in (0.0, 1.0, 0.5):
        out = conditioning_inputs(ldm, batch, p, rng)
        assert sorted(out) == sorted(keys)
        out = {k: np.asarray(v) for k, v in out.items()}
        dropped = np.asarray(jax.random.uniform(rng, (BATCH,)) < p)
        if p == 0.5:
            assert 0 < dropped.sum() < BATCH  # both kinds of rows, so the check below means something
        else:
            assert dropped.all() == (p == 1.0) and dropped.any() == (p == 1.0)
        np.testing.assert_array_equal(_is_null(out, null_row), dropped)
        for k in keys:
            assert out[k].dtype == inputs[k].dtype and out[k].shape == inputs[k].shape
            np.testing.assert_array_equal(out[k][~dropped], inputs[k][~dropped])  # kept rows untouched


# -------------------------------------------------------------------------------------------------- sample.py


def run_sample_py(workdir: str, outdir: str, *extra: str) -> subprocess.CompletedProcess:
    """``sample.py`` on ``workdir`` without --config (the config saved with the run), on one CPU device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop("LIDIFF_DEBUG", None)
    return subprocess.run(
        [sys.executable, "sample.py", f"--workdir={workdir}", f"--outdir={outdir}", "--num_samples=6",
         "--batch_size=6", f"--steps={SAMPLE_STEPS}", "--guidance_scale=2.0", "--seed=3", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A refusal: exit status != 0, no traceback, one ``error:`` line holding every needle. Returns the line."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_layout_file(path, layouts) -> str:
    with open(path, "w") as f:
        json.dump(layouts, f)
    return str(path)


def test_sample_py_text_prompts_and_prompts_file(text_run, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a green circle\n\n  a yellow square  \n")
    outdir = tmp_path / "samples"
    result = run_sample_py(text_run.workdir, str(outdir), "--prompt=a red square", "--prompt=a blue circle",
                           f"--prompts_file={prompts_file}")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(outdir / "samples.npz") as data:
        images, prompts = data["images"], data["prompts"].tolist()
        assert "labels" not in data.files and "boxes" not in data.files
    assert images.shape == (6, RES, RES, 3) and images.dtype == np.uint8
    # --prompt values, then the file's non-empty lines (stripped), cycled over the 6 samples
    assert prompts == ["a red square", "a blue circle", "a green circle", "a yellow square", "a red square",
                       "a blue circle"]
    assert len(os.listdir(outdir / "images")) == 6


def test_sample_py_layout_file(layout_run, tmp_path):
    layouts = [[{"bbox": [0.1, 0.1, 0.6, 0.6], "label": 3}],
               [{"bbox": [0.0, 0.0, 0.5, 0.5], "label": 1}, {"bbox": [0.5, 0.5, 1.0, 1.0], "label": 7}]]
    layout_file = write_layout_file(tmp_path / "layout.json", layouts)
    outdir = tmp_path / "samples"
    result = run_sample_py(layout_run.workdir, str(outdir), f"--layout={layout_file}")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(outdir / "samples.npz") as data:
        images, boxes, box_labels = data["images"], data["boxes"], data["box_labels"]
        assert "prompts" not in data.files and "labels" not in data.files
    assert images.shape == (6, RES, RES, 3) and images.dtype == np.uint8
    assert boxes.shape == (6, MAX_BOXES, 4) and box_labels.shape == (6, MAX_BOXES)
    expected_boxes, expected_labels = read_layout_file(layout_file, num_classes=DIGIT_CLASSES, max_boxes=MAX_BOXES)
    np.testing.assert_array_equal(boxes, expected_boxes[[0, 1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(box_labels, expected_labels[[0, 1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(box_labels[0], [3, -1, -1])
    np.testing.assert_array_equal(box_labels[1], [1, 7, -1])
    np.testing.assert_allclose(boxes[1, 1], [0.5, 0.5, 1.0, 1.0])


def test_sample_py_refuses_a_prompt_for_a_class_model(adm_run, tmp_path):
    result = run_sample_py(adm_run.workdir, str(tmp_path / "out"), "--prompt=a cat")
    assert_refused(result, "--prompt/--prompts_file given", "takes --class_label/--labels", adm_run.workdir)
    assert not (tmp_path / "out").exists()


def test_sample_py_refuses_a_text_model_without_prompts(text_run, tmp_path):
    result = run_sample_py(text_run.workdir, str(tmp_path / "out"))
    assert_refused(result, "text-conditioned", "--prompt=", "--prompts_file=FILE")
    assert not (tmp_path / "out").exists()


def test_sample_py_refuses_a_box_outside_the_image(layout_run, tmp_path):
    layout_file = write_layout_file(tmp_path / "bad.json", [[{"bbox": [0.2, 0.2, 1.3, 0.9], "label": 2}]])
    result = run_sample_py(layout_run.workdir, str(tmp_path / "out"), f"--layout={layout_file}")
    assert_refused(result, "--layout", layout_file, "layout 0, object 0", "outside [0, 1]", "fractions")
    assert not (tmp_path / "out").exists()


# sample.conditioning() for several flag sets in one process (a fresh one: sample.py defines global absl flags),
# against the configs of the runs (no model is loaded: the refusals come from the flags and the config alone)
CONDITIONING_SCRIPT = r"""
import json, sys, types
from absl import flags
from ml_collections import ConfigDict
import sample
from lidiff.data.text import load_tokenizer
from lidiff.errors import UserError

results = []
for case in json.loads(sys.argv[1]):
    with open(case["config"]) as f:
        config = ConfigDict(json.load(f))
    tokenizer = load_tokenizer(case["tokenizer"]) if case["tokenizer"] else None
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sample.py", "--workdir=" + case["workdir"]] + case["flags"])
    try:
        inputs, record = sample.conditioning(types.SimpleNamespace(config=config, tokenizer=tokenizer), 4)
        results.append({"shapes": {k: list(v.shape) for k, v in inputs.items()}, "record": sorted(record)})
    except UserError as e:
        results.append({"error": str(e), "type": type(e).__name__})
print("RESULTS " + json.dumps(results))
"""


def test_sample_conditioning_refusals(adm_run, text_run, layout_run, tmp_path):
    def config_file(run, kind=None):
        config = ConfigDict(run.config.to_dict())
        if kind is not None:  # the same run, as an unconditional model
            config.diffusion.conditioning.kind = kind
        path = tmp_path / f"{run.kind}_{kind}.json"
        path.write_text(config.to_json())
        return str(path)

    bad_class = write_layout_file(tmp_path / "class10.json", [[{"bbox": [0.1, 0.1, 0.5, 0.5], "label": 10}]])
    good_layout = write_layout_file(tmp_path / "good.json", [[{"bbox": [0.1, 0.1, 0.5, 0.5], "label": 9}]])
    missing = str(tmp_path / "no_prompts.txt")
    tok = tokenizer_dir(text_run.workdir)
    cases = [
        # name, run, kind override, tokenizer, flags, expected (None: accepted) -> needles of the message
        ("unconditional + --prompt", adm_run, "none", "", ["--prompt=a cat"],
         ["--prompt/--prompts_file given", "is unconditional"]),
        ("unconditional + --class_label", adm_run, "none", "", ["--class_label=1"],
         ["--class_label/--labels given", "is unconditional"]),
        ("class id >= num_classes", layout_run, None, "", [f"--layout={bad_class}"],
         ["--layout", bad_class, "class id 10 outside [0, 10)"]),
        ("text + --class_label", text_run, None, tok, ["--class_label=1"],
         ["--class_label/--labels given", "takes --prompt/--prompts_file"]),
        ("missing --prompts_file", text_run, None, tok, [f"--prompts_file={missing}"],
         [f"--prompts_file={missing}", "no such file"]),
        ("class + --layout", adm_run, None, "", [f"--layout={good_layout}"],
         ["--layout given", "takes --class_label/--labels"]),
        ("class label out of range", adm_run, None, "", ["--class_label=3"],
         ["--class_label", "outside [0, 3)"]),
        ("text + --prompt (accepted)", text_run, None, tok, ["--prompt=a red square"], None),
        ("layout (accepted)", layout_run, None, "", [f"--layout={good_layout}"], None),
        ("class (accepted)", adm_run, None, "", ["--class_label=2"], None),
    ]
    spec = [{"config": config_file(run, kind), "tokenizer": tok_dir, "flags": flag_list, "workdir": run.workdir}
            for _, run, kind, tok_dir, flag_list, _ in cases]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", CONDITIONING_SCRIPT, json.dumps(spec)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")]
    assert len(line) == 1, result.stdout[-2000:]
    outcomes = json.loads(line[0][len("RESULTS "):])
    assert len(outcomes) == len(cases)
    expected_shapes = {"text + --prompt (accepted)": {"tokens": [4, MAX_LEN]},
                       "layout (accepted)": {"boxes": [4, MAX_BOXES, 4], "box_labels": [4, MAX_BOXES]},
                       "class (accepted)": {"label": [4]}}
    for (name, *_, needles), outcome in zip(cases, outcomes):
        if needles is None:
            assert outcome.get("shapes") == expected_shapes[name], (name, outcome)
            continue
        assert outcome.get("type") == "ConfigError", (name, outcome)  # a UserError: cli prints it as one line
        message = outcome["error"]
        assert "\n" not in message, (name, message)
        for needle in needles:
            assert needle in message, (name, needle, message)


# --------------------------------------------------------------------------------------------- config refusals


def test_check_conditioning_names_the_fields(caption_dir, tmp_path):
    text = stage2_config("text", text_data(caption_dir))
    check_conditioning(text.diffusion.conditioning, text.diffusion.model)  # the runs' own config passes
    text.diffusion.model.context_dim = 2 * EMBED
    with pytest.raises(ConfigError) as e:
        check_conditioning(text.diffusion.conditioning, text.diffusion.model)
    message = str(e.value)
    assert f"config.diffusion.model.context_dim ({2 * EMBED})" in message
    assert f"config.diffusion.conditioning.embed_dim ({EMBED})" in message
    # train_diffusion refuses it before reading the first stage or writing anything
    with pytest.raises(ConfigError, match=r"context_dim .* must equal"):
        train_diffusion(text, str(tmp_path / "text"))
    assert not (tmp_path / "text").exists()

    layout = stage2_config("layout", layout_data())
    check_conditioning(layout.diffusion.conditioning, layout.diffusion.model)
    layout.diffusion.model.use_spatial_transformer = False
    with pytest.raises(ConfigError) as e:
        check_conditioning(layout.diffusion.conditioning, layout.diffusion.model)
    message = str(e.value)
    assert "config.diffusion.conditioning.kind='layout'" in message
    assert "config.diffusion.model.use_spatial_transformer=True" in message

    adm = stage2_config("class", class_data(), mode="adm")
    check_conditioning(adm.diffusion.conditioning, adm.diffusion.model)
    adm.diffusion.model.context_dim = EMBED  # adm feeds no cross-attention
    with pytest.raises(ConfigError, match=r"context_dim=16 but nothing feeds cross-attention.*set it to 0"):
        check_conditioning(adm.diffusion.conditioning, adm.diffusion.model)
