"""pth -> safetensors conversion of the FID Inception: strict keys, round trip through the command, messages."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from torch_inception_ref import random_fid_inception  # noqa: E402

from lidiff.convert import inception_weights as iw  # noqa: E402
from lidiff.convert.common import ConversionError, flatten  # noqa: E402
from lidiff.models.inception import inception_variable_shapes  # noqa: E402


@pytest.fixture(scope="module")
def state_dict():
    return random_fid_inception(seed=3).state_dict()  # includes bn.num_batches_tracked, as torchvision saves


def test_command_converts_a_pth_and_the_file_loads_without_torch_pickle(state_dict, tmp_path, capsys):
    pth, out = tmp_path / "pt_inception-2015-12-05-test.pth", tmp_path / "w" / "inception.safetensors"
    torch.save(state_dict, pth)
    iw.main(["--pth", str(pth), "--out", str(out)])
    assert "wrote 23,885,392" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert f.metadata()["format"] == iw.FORMAT
        assert f.metadata()["source"] == pth.name
    loaded = flatten(iw.load_inception_variables(str(out)))
    want = flatten(iw.inception_variables_from_state_dict(state_dict))
    assert loaded.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(loaded[key], want[key])
    w = state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # [O, I, 1, 7]
    np.testing.assert_array_equal(loaded[("params", "Mixed_6b", "branch7x7_2", "conv", "kernel")],
                                  w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded[("batch_stats", "Mixed_7c", "branch_pool", "bn", "var")],
                                  state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())
    np.testing.assert_array_equal(loaded[("params", "fc", "kernel")], state_dict["fc.weight"].numpy().T)


def test_missing_unexpected_and_misshaped_keys_are_named(state_dict):
    sd = dict(state_dict)
    del sd["Mixed_5b.branch_pool.bn.running_mean"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    sd["fc.bias"] = torch.zeros(1000)
    with pytest.raises(ConversionError) as e:
        iw.inception_variables_from_state_dict(sd)
    msg = str(e.value)
    assert "batch_stats/Mixed_5b/branch_pool/bn/mean" in msg
    assert "AuxLogits.fc.weight" in msg
    assert "fc.bias (1000,)" in msg and "(1008,)" in msg


def test_missing_or_wrong_weights_file_messages(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        iw.load_inception_variables(str(tmp_path / "none.safetensors"))
    assert "none.safetensors" in str(e.value) and iw.conversion_command(str(tmp_path / "none.safetensors")) in str(
        e.value
    )
    from safetensors.numpy import save_file

    save_file({"params/fc/kernel": np.zeros((3, 3), np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=r"missing \(\d+\).*\n.*shape mismatch"):
        iw.load_inception_variables(str(tmp_path / "bad.safetensors"))


def test_key_mapping_is_invertible():
    for path in flatten(inception_variable_shapes()):
        assert iw.torch_key_to_path(iw.path_to_torch_key(path))[:-1] == path[:-1]
