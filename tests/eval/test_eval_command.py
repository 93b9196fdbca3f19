"""``python -m lidiff.eval`` end to end (random Inception, labelled), sharding parity, and refusals of bad input.

Kept small for 2 CPU cores: 10 sample images, 8 reference images of the digits config, batch 8; the compiled
Inception is shared by every run on the same mesh (``lidiff.eval.features`` caches the jitted function).
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from lidiff import parallel
from lidiff.eval.__main__ import main, run
from lidiff.eval.sources import open_input
from lidiff.metrics.fid import load_stats

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "digits_kl.py")
COMMON = ["--reference", CONFIG, "--num_reference", "8", "--batch_size", "8", "--allow_random_inception",
          "--kid_subsets", "5", "--no_progress", "--inception_weights", "/nonexistent/inception.safetensors"]


def _images(n=10, size=32, seed=0):
    """Digit-like images: smooth blobs on black, uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cy, cx, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out.append(np.repeat((255 * g)[..., None], 3, -1))
    return np.rint(np.stack(out)).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    images = _images()
    np.savez(d / "samples.npz", images=images, sampler=np.asarray("ddim"), steps=np.int64(50), step=np.int64(7))
    os.makedirs(d / "folder")
    for i, image in enumerate(images):
        Image.fromarray(image).save(d / "folder" / f"{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def npz_run(workdir):
    """The command on the samples .npz against the digits config, over the 8 forced CPU devices: (JSON, stdout)."""
    assert len(jax.devices()) == 8
    out = workdir / "result.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(["--samples", str(workdir / "samples.npz"), "--out", str(out), "--save_stats", str(workdir / "a.npz"),
             *COMMON])
    return json.loads(out.read_text()), printed.getvalue()


def test_npz_against_dataset_config_end_to_end(npz_run, workdir):
    r, _ = npz_run
    for key in ("fid", "precision", "recall", "kid", "inception_score"):
        assert np.isfinite(r[key]), key
    assert r["fid"] > 0
    assert r["num_samples"] == 10 and r["num_reference"] == 8
    assert r["random_inception"] is True
    assert r["settings"]["devices"] == 8
    assert r["sampler_settings"] == {"sampler": "ddim", "steps": 50, "step": 7} and r["checkpoint_step"] == 7
    assert "F.interpolate" in r["preprocessing"]["resize"]
    assert r["reference"]["kind"] == "dataset config" and r["reference"]["data"]["source"] == "digits"
    assert any("FID is biased" in w for w in r["warnings"])  # N = 10 and 8 < 2048
    stats = load_stats(str(workdir / "a.npz"), dim=2048)
    assert stats.num_images == 10 and stats.meta["random_inception"] is True


def test_every_printed_line_says_random_inception(npz_run):
    lines = npz_run[1].strip().splitlines()
    assert len(lines) >= 8
    assert all(line.startswith("[RANDOM INCEPTION") for line in lines), lines
    assert any("FID is biased" in line for line in lines)
    assert any("F.interpolate" in line for line in lines)  # the resize is printed with the scores


def test_one_device_gives_the_eight_device_numbers(npz_run, workdir):
    eight, _ = npz_run
    one = run(["--samples", str(workdir / "samples.npz"), *COMMON], mesh=parallel.make_mesh(jax.devices()[:1]))
    assert one["settings"]["devices"] == 1
    for key in ("fid", "kid", "inception_score"):
        assert one[key] == pytest.approx(eight[key], rel=1e-4, abs=1e-6), key
    assert (one["precision"], one["recall"]) == (eight["precision"], eight["recall"])


def test_image_folder_against_the_digits_config_scores_like_the_npz(npz_run, workdir):
    eight, _ = npz_run
    r = run(["--samples", str(workdir / "folder"), *COMMON])
    assert r["samples"]["kind"] == "image folder" and r["num_samples"] == 10
    for key in ("fid", "precision", "recall", "kid", "inception_score"):  # PNG is lossless: the npz's numbers
        assert r[key] == pytest.approx(eight[key], rel=1e-6, abs=1e-9), key


def test_dataset_statistics_file_then_stats_against_stats(npz_run, workdir):
    eight, _ = npz_run
    ref = workdir / "digits_ref.npz"
    only = run(["--samples", CONFIG, "--num_samples", "8", "--save_stats", str(ref), *COMMON[2:]])
    assert "fid" not in only and only["num_samples"] == 8
    stats = load_stats(str(ref), dim=2048)
    assert stats.num_images == 8
    assert stats.meta["source"]["kind"] == "dataset config" and "centre crop 32x32" in str(stats.meta["source"])
    assert "F.interpolate" in stats.meta["resize"]
    # the samples' stats (saved by the first run) against these: the same FID, and nothing that needs features
    r = run(["--samples", str(workdir / "a.npz"), "--reference", str(ref), *COMMON[2:]])
    assert r["fid"] == pytest.approx(eight["fid"], rel=1e-9)
    assert r["samples"]["kind"].startswith("statistics") and r["num_reference"] == 8
    assert not {"precision", "recall", "kid", "inception_score"} & set(r)
    assert r["reference"]["recorded_preprocessing"]["random_inception"] is True


def test_num_samples_caps_what_is_read(workdir):
    source = open_input(str(workdir / "samples.npz"), limit=4)
    batches = list(source.batches(3))
    assert source.num_images == 4 and [len(b) for b in batches] == [3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), np.load(workdir / "samples.npz")["images"][:4])
    folder = open_input(str(workdir / "folder"), limit=5)
    assert folder.num_images == 5 and sum(len(b) for b in folder.batches(2)) == 5
    dataset = open_input(CONFIG, limit=6)
    images = np.concatenate(list(dataset.batches(4)))
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8


def _fails(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_stats_of_the_wrong_shape_are_refused(workdir, capsys):
    np.savez(workdir / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    err = _fails(["--samples", str(workdir / "samples.npz"), "--reference", str(workdir / "small.npz"),
                  "--allow_random_inception"], capsys)
    assert "dimension 64, expected 2048" in err and "small.npz" in err


def test_images_of_mixed_sizes_are_refused(workdir, capsys):
    folder = workdir / "mixed"
    os.makedirs(folder)
    Image.fromarray(_images(1)[0]).save(folder / "a.png")
    Image.fromarray(_images(1, size=40)[0]).save(folder / "b.png")
    err = _fails(["--samples", str(folder), *COMMON], capsys)
    assert "mixed sizes" in err and "b.png" in err and "40x40" in err


def test_missing_weights_name_the_file_and_the_convert_command(workdir, capsys):
    err = _fails(["--samples", str(workdir / "samples.npz"), "--reference", CONFIG,
                  "--inception_weights", "/nonexistent/inception.safetensors"], capsys)
    assert "/nonexistent/inception.safetensors" in err
    assert "python -m lidiff.convert.inception_weights --pth" in err
    assert "--allow_random_inception" in err


def test_unknown_npz_contents_and_missing_paths_are_refused(workdir, capsys):
    np.savez(workdir / "odd.npz", x=np.zeros(3))
    err = _fails(["--samples", str(workdir / "odd.npz"), *COMMON], capsys)
    assert "'images'" in err and "'mu' and 'sigma'" in err
    err = _fails(["--samples", str(workdir / "nothing_here"), *COMMON], capsys)
    assert "no such file or folder" in err
    np.savez(workdir / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    err = _fails(["--samples", str(workdir / "float.npz"), *COMMON], capsys)
    assert "uint8" in err


def test_adm_reference_batches_images_and_activations(workdir):
    images = _images(4)
    np.savez(workdir / "adm_images.npz", arr_0=images)
    source = open_input(str(workdir / "adm_images.npz"))
    assert source.describe()["kind"].startswith("ADM") and source.num_images == 4
    np.testing.assert_array_equal(np.concatenate(list(source.batches(3))), images)
    rng = np.random.default_rng(0)
    np.savez(workdir / "acts_a.npz", arr_0=rng.standard_normal((20, 2048)).astype(np.float32))
    np.savez(workdir / "acts_b.npz", arr_0=rng.standard_normal((20, 2048)).astype(np.float32) + 0.5)
    r = run(["--samples", str(workdir / "acts_a.npz"), "--reference", str(workdir / "acts_b.npz"), *COMMON[2:]])
    assert r["samples"]["kind"] == "precomputed activations" and r["settings"]["devices"] == 0  # no Inception ran
    assert r["fid"] > 2048 * 0.25 * 0.9  # |mu_a - mu_b|^2 alone is about 2048 * 0.5^2
    assert r["precision"] < 0.5 and "inception_score" not in r


def test_a_weights_file_that_is_not_the_converted_inception_is_refused(workdir, capsys):
    from safetensors.numpy import save_file

    bad = workdir / "bad.safetensors"
    save_file({"params/fc/kernel": np.zeros((2, 2), np.float32)}, str(bad))
    err = _fails(["--samples", str(workdir / "samples.npz"), "--reference", CONFIG, "--inception_weights", str(bad)],
                 capsys)
    assert "does not hold the FID Inception variables" in err and "python -m lidiff.convert.inception_weights" in err
