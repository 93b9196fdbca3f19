"""The text-to-image demo end to end: ``train.py --config=configs/digits_text.py`` on a shortened schedule (both
stages, a WordPiece vocabulary trained on the captions, caption tokens in the latent cache, the text transformer
trained jointly with the UNet, guided DDIM samples from prompts), then a digit classifier checks that the samples
show the digit their prompt names.

The classifier and the way samples are read are those of ``benchmarks/quickstart_accuracy.py`` (through
``benchmarks/conditioning_accuracy.py``, which scores the full run). The shortened run trains the autoencoder for
``AE_STEPS`` and the LDM for ``LDM_STEPS`` (the full run: 400 and 1500) and samples ``PER_PROMPT`` images for each
of the config's 30 prompts (the full run: 4); everything else is as shipped.

Measured: the prompts take hold between LDM steps 400 and 600. One such run's checkpoints, 120 samples under two
sampling seeds each, read 0.24-0.28 at 300 steps, 0.45-0.48 at 400, 0.59-0.70 at 500, 0.79-0.85 at 600 and
0.88-0.89 at 800 (the full run: 97.5%), so ``LDM_STEPS`` = 600 leaves ``MIN_ACCURACY`` = 0.5 a wide margin, while a
run that ignores the prompts lands near chance (10%). With pytest on the 2 cores under light other load (load
average 1.5-1.8) the test took 186 s (274 s of CPU time) and read 43 of 60 samples (0.72) right.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import digits_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_STEPS, LDM_STEPS, PER_PROMPT = 100, 600, 2
MIN_ACCURACY = 0.5


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ca = _load("conditioning_accuracy")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_text") / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the demo
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/digits_text.py", f"--workdir={workdir}",
         f"--config.autoencoder.train.num_steps={AE_STEPS}", f"--config.diffusion.train.num_steps={LDM_STEPS}",
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
    for stage in ("autoencoder", "diffusion"):
        assert os.path.isdir(workdir / stage / "checkpoints")

    classifier, held_out_accuracy = ca.fit_digit_classifier()
    assert held_out_accuracy >= 0.9
    result = ca.evaluate(str(workdir / "samples.npz"), classifier)
    per_class = ", ".join(f"{label}: {correct}/{count}" for label, count, correct in result["per_class"])
    assert result["accuracy"] >= MIN_ACCURACY, f"accuracy {result['accuracy']:.2f} ({per_class})"
