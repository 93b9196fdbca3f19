"""The digit demos end to end on shortened schedules, each read back by a digit classifier.

**Quickstart.** ``train.py --config=configs/quickstart.py`` (both stages, latent cache, scale_by_std,
class-conditional LDM, guided DDIM samples), then a digit classifier checks that the samples show the digits they
were asked for. The classifier and the way samples are read (box-downscale 32x32 -> 8x8, grey levels 0..16 as
``load_digits``) are those of ``benchmarks/quickstart_accuracy.py``, which scores the full run. The shortened run
trains the autoencoder for ``AE_STEPS`` and the LDM for ``QUICKSTART_LDM_STEPS`` (the full run: 400 and 1500) and
keeps everything else as shipped; it reaches 71% (measured; ~85% at 600 LDM steps, the full run about 95%), so
``MIN_ACCURACY`` leaves a margin while a broken stage (untrained UNet, labels ignored, wrong scale_factor, wrong
decode) lands near chance (10%).

**Text.** ``train.py --config=configs/digits_text.py`` with ``stages=("diffusion",)`` on the quickstart run's
autoencoder (the demo's stage 1 is the quickstart's recipe on the same digits; training it once keeps the suite
short): a WordPiece vocabulary trained on the captions, caption tokens in the latent cache, the text transformer
trained jointly with the UNet, guided DDIM samples from prompts, read through ``benchmarks/conditioning_accuracy.py``.
It trains the LDM for ``LDM_STEPS`` and samples ``PER_PROMPT`` images for each of the config's 30 prompts (the full
run: 4). Measured: the prompts take hold between LDM steps 400 and 600. One such run's checkpoints, 120 samples under
two sampling seeds each, read 0.24-0.28 at 300 steps, 0.45-0.48 at 400, 0.59-0.70 at 500, 0.79-0.85 at 600 and
0.88-0.89 at 800 (the full run: 97.5%), so ``LDM_STEPS`` = 600 leaves ``MIN_TEXT_ACCURACY`` = 0.5 a wide margin,
while a run that ignores the prompts lands near chance (10%).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import digits_text
from lidiff.data import transforms
from lidiff.data.sources import DigitsSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_STEPS, QUICKSTART_LDM_STEPS, LDM_STEPS = 100, 400, 600
MIN_ACCURACY = 0.5
PER_PROMPT, MIN_TEXT_ACCURACY = 2, 0.5


def _load_accuracy_module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qa = _load_accuracy_module("quickstart_accuracy")
ca = _load_accuracy_module("conditioning_accuracy")


@pytest.fixture(scope="module")
def classifier():
    classifier, held_out_accuracy = qa.fit_digit_classifier()
    assert held_out_accuracy >= 0.9
    return classifier


def test_classifier_reads_digits_the_way_samples_are_read(classifier):
    """Held-out digits made into 32x32 RGB exactly as the training data (``DigitsSource`` + the loader's
    resize), then read back as samples are, are still classified correctly."""
    source = DigitsSource()
    _, held_out = qa.split_digits()
    images = np.stack([transforms.resize_center_crop(source[int(i)]["image"], 32) for i in held_out])
    assert images.shape == (len(held_out), 32, 32, 3) and images.dtype == np.uint8
    predicted = classifier.predict(qa.samples_to_digit_features(images))
    assert np.mean(predicted == source.labels[held_out]) >= 0.9


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart") / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the quickstart
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
         f"--config.autoencoder.train.num_steps={AE_STEPS}",
         f"--config.diffusion.train.num_steps={QUICKSTART_LDM_STEPS}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_quickstart_samples_show_the_requested_digits(quickstart_run, classifier):
    workdir = quickstart_run
    with np.load(workdir / "samples.npz") as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 10))
    grid = np.asarray(Image.open(workdir / "samples_grid.png"))
    assert grid.shape[0] > 10 * 32 and grid.shape[1] > 10 * 32  # 10 rows of 10
    for stage in ("autoencoder", "diffusion"):
        assert os.path.isdir(workdir / stage / "checkpoints")
    result = qa.evaluate(str(workdir / "samples.npz"), classifier)
    per_class = ", ".join(f"{label}: {correct}/{n}" for label, n, correct in result["per_class"])
    assert result["accuracy"] >= MIN_ACCURACY, f"accuracy {result['accuracy']:.2f} ({per_class})"


@pytest.fixture(scope="module")
def text_run(quickstart_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_text") / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the demo
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/digits_text.py", f"--workdir={workdir}",
         "--config.stages=('diffusion',)", f"--config.diffusion.first_stage.workdir={quickstart_run}",
         f"--config.diffusion.train.num_steps={LDM_STEPS}",
         f"--config.diffusion.sample.final_samples_per_class={PER_PROMPT}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_digits_text_samples_show_the_digit_their_prompt_names(text_run):
    workdir = text_run
    config = digits_text.get_config()
    prompts, digits = config.diffusion.sample.prompts, config.diffusion.sample.prompt_labels
    n = len(prompts) * PER_PROMPT
    with np.load(workdir / "samples.npz") as data:
        assert ca.detect_kind(data.files) == "text"
        images, labels, sample_prompts = data["images"], data["labels"], data["prompts"]
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert sample_prompts.shape == (n,) and sample_prompts.dtype.kind == "U"
    np.testing.assert_array_equal(sample_prompts, np.repeat(prompts, PER_PROMPT))
    np.testing.assert_array_equal(labels, np.repeat(digits, PER_PROMPT))
    grid = np.asarray(Image.open(workdir / "samples_grid.png"))
    assert grid.shape[0] > len(prompts) * 32 and grid.shape[1] > PER_PROMPT * 32  # one row per prompt
    assert os.path.isfile(workdir / "diffusion" / "tokenizer" / "vocab.txt")  # the run carries its vocabulary
    assert os.path.isdir(workdir / "diffusion" / "checkpoints")

    classifier, held_out_accuracy = ca.fit_digit_classifier()
    assert held_out_accuracy >= 0.9
    result = ca.evaluate(str(workdir / "samples.npz"), classifier)
    per_class = ", ".join(f"{label}: {correct}/{count}" for label, count, correct in result["per_class"])
    assert result["accuracy"] >= MIN_TEXT_ACCURACY, f"accuracy {result['accuracy']:.2f} ({per_class})"
