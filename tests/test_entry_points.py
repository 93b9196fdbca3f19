"""Entry points refuse bad input with a message that names the problem, before any compiling or training.

``train.py`` runs as a subprocess where the command line itself is under test; the other refusals call
``lidiff.train.train_and_evaluate`` (what ``train.py`` hands off to) in-process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import digits_kl
from lidiff.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train_py(*args, workdir):
    """``python train.py --config=configs/digits_kl.py --workdir=<workdir> <args>`` -> CompletedProcess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "train.py", "--config=configs/digits_kl.py", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def digits_config(**loss):
    """configs/digits_kl.py with loss overrides (a small config that fails before any compile)."""
    config = digits_kl.get_config()
    config.autoencoder.loss.update(loss)
    return config


def test_unknown_config_keys_on_the_command_line_are_named(tmp_path):
    result = run_train_py("--config.autoencoder.train.no_such_key=1", "--config.autoencoder.train.num_step=3",
                          "--config.nosection.x=2", workdir=str(tmp_path / "run"))
    assert result.returncode != 0
    err = result.stderr
    assert "--config.autoencoder.train.no_such_key: config.autoencoder.train has no field 'no_such_key'" in err
    assert "num_steps" in err.split("no_such_key")[-1]  # the fields that do exist are listed
    assert "'num_step' (did you mean 'num_steps'?)" in err
    assert "--config.nosection.x: config has no field 'nosection'" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")


def test_bad_value_on_the_command_line_is_named(tmp_path):
    result = run_train_py("--config.autoencoder.train.num_steps=many", workdir=str(tmp_path / "run"))
    assert result.returncode != 0
    assert "--config.autoencoder.train.num_steps=many" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_folder_is_named(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    result = run_train_py("--config.data.source=folder", f"--config.data.path={missing}",
                          workdir=str(tmp_path / "run"))
    assert result.returncode != 0
    assert f"Image folder '{missing}' does not exist" in result.stderr
    assert "config.data.path" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "autoencoder" / "checkpoints")


def test_empty_data_path_is_refused(tmp_path):
    config = digits_config()
    config.data.source = "folder"
    with pytest.raises(ValueError, match=r"config\.data\.path is empty"):
        train_and_evaluate(config, str(tmp_path))


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no images here")
    config = digits_config()
    config.data.source = "folder"
    config.data.path = str(tmp_path / "data")
    with pytest.raises(ValueError, match="No images found in"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_perceptual_loss_without_lpips_weights_says_how_to_convert(tmp_path):
    config = digits_config(perceptual_weight=1.0, lpips_weights="")
    with pytest.raises(FileNotFoundError) as info:
        train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert "config.autoencoder.loss.lpips_weights is empty" in message
    assert "python -m lidiff.convert.lpips_weights" in message
    assert "perceptual_weight=0" in message


def test_missing_lpips_weights_file_is_named_with_conversion_command(tmp_path):
    missing = str(tmp_path / "weights" / "lpips_vgg16.safetensors")
    config = digits_config(perceptual_weight=1.0, lpips_weights=missing)
    with pytest.raises(FileNotFoundError) as info:
        train_and_evaluate(config, str(tmp_path / "run"))
    message = str(info.value)
    assert f"LPIPS weights not found at '{missing}'" in message
    assert f"python -m lidiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth --out {missing}" in message
    assert "vgg16-397923af.pth" in message


def test_unknown_stage_is_refused(tmp_path):
    config = digits_config()
    config.stages = ("autoencoder", "vae")
    with pytest.raises(ValueError, match=r"config\.stages=.*'vae'"):
        train_and_evaluate(config, str(tmp_path))


# ----------------------------------------------------------------------------- user mistakes end in a message


def run_command(*cmd, devices=1, timeout=300):
    """Runs ``python <cmd>`` in the repository with ``devices`` forced CPU devices -> CompletedProcess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(result, *phrases):
    """Non-zero exit, every phrase on stderr, no traceback anywhere, and no backend-probing noise."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr[-2000:])
    assert "Traceback" not in output, output[-3000:]
    assert "Unable to initialize backend" not in output


def test_train_py_missing_config_file(tmp_path):
    result = run_command("train.py", "--config=configs/digits_kll.py", f"--workdir={tmp_path}")
    assert_refused(result, "--config=configs/digits_kll.py: no such config file", "did you mean configs/digits_kl.py")


def test_train_py_negative_batch_size_names_the_config_field(tmp_path):
    result = run_command("train.py", "--config=configs/digits_kl.py", f"--workdir={tmp_path}",
                         "--config.autoencoder.train.batch_size=-4")
    assert_refused(result, "config.autoencoder.train.batch_size=-4", "must be positive")


def test_train_py_batch_size_not_dividing_over_devices(tmp_path):
    result = run_command("train.py", "--config=configs/digits_kl.py", f"--workdir={tmp_path}",
                         "--config.autoencoder.train.batch_size=12", devices=8)
    assert_refused(result, "config.autoencoder.train.batch_size=12 does not divide over the 8 devices",
                   "autoencoder.train.batch_size=8")


def test_train_py_missing_folder_is_a_message(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    result = run_command("train.py", "--config=configs/digits_kl.py", f"--workdir={tmp_path / 'run'}",
                         "--config.data.source=folder", f"--config.data.path={missing}")
    assert_refused(result, f"Image folder '{missing}' does not exist", "config.data.path")


def test_train_py_folder_of_corrupt_images_is_refused_before_compiling(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(101):
        (folder / f"img{i:03d}.jpg").write_bytes(b"not a jpeg")
    result = run_command("train.py", "--config=configs/digits_kl.py", f"--workdir={tmp_path / 'run'}",
                         "--config.data.source=folder", f"--config.data.path={folder}")
    assert_refused(result, "Data loading failed", "unreadable")
    assert "compiled" not in result.stderr  # refused before the step was compiled


def test_sample_py_without_a_stage_two_checkpoint(tmp_path):
    result = run_command("sample.py", "--config=configs/quickstart.py", f"--workdir={tmp_path}")
    assert_refused(result, f"--workdir={tmp_path}: no stage-2 (diffusion) checkpoint", "train stage 2 first")


def test_eval_command_missing_inception_weights(tmp_path):
    np_path = tmp_path / "samples.npz"
    np.savez(np_path, images=np.zeros((4, 8, 8, 3), np.uint8))
    result = run_command("-m", "lidiff.eval", "--samples", str(np_path), "--reference", str(np_path),
                         "--inception_weights", str(tmp_path / "missing.safetensors"))
    assert_refused(result, "FID Inception weights not found", "python -m lidiff.convert.inception_weights")


def test_eval_command_without_inputs(tmp_path):
    result = run_command("-m", "lidiff.eval", "--allow_random_inception")
    assert_refused(result, "give --samples (score generated images) or --autoencoder (score a first stage)")
