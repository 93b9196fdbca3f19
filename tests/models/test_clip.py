"""CLIP text tower (lidiff.models.clip) and its converter (lidiff.convert.clip): parity with transformers'
PyTorch CLIPTextModel on random weights, folder round trip, and strict refusals.

One file for model and converter: a second ``test_clip.py`` under tests/convert would clash on import.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lidiff.convert.clip import clip_config_from_hf, clip_params_from_state_dict, load_clip_text_encoder
from lidiff.convert.common import ConversionError
from lidiff.errors import ConfigError, MissingInputError
from lidiff.models.clip import CLIPTextTransformer

TOL = 1e-4
VOCAB, LENGTH = 1000, 77


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_config(act: str, layers: int = 3) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=act,
                          pad_token_id=1, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)


def random_clip(act: str, seed: int) -> CLIPTextModel:
    """A CLIPTextModel with every parameter random (transformers' init has zero biases and unit LayerNorms,
    which would hide a bias or LayerNorm mix-up): Linear weights N(0, 1/fan_in), biases N(0, 0.1^2),
    LayerNorm weights 1 + N(0, 0.1^2), embeddings N(0, 1)."""
    torch.manual_seed(seed)
    model = CLIPTextModel(hf_config(act))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape)
            if "embedding" in name:
                p.copy_(noise)
            elif p.ndim == 2:
                p.copy_(noise / np.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def quick():
    return random_clip("quick_gelu", 0)


@pytest.fixture(scope="module")
def gelu():
    return random_clip("gelu", 1)


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH)).astype(np.int32)


def lidiff_model(ref: CLIPTextModel, **kw):
    model = CLIPTextTransformer(**clip_config_from_hf(ref.config), **kw)
    return model, clip_params_from_state_dict(ref.state_dict(), model)


def torch_out(ref: CLIPTextModel, ids: np.ndarray, output: str, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask).long()
        o = ref(torch.from_numpy(ids).long(), attention_mask=mask, output_hidden_states=True)
        if output == "last":
            return o.last_hidden_state.numpy()
        return ref.final_layer_norm(o.hidden_states[-2]).numpy()  # SD v2: penultimate layer, then ln_final


# ------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("act,output", [("quick_gelu", "last"), ("gelu", "penultimate"), ("gelu", "last")])
@pytest.mark.parametrize("kernel", ["xla", "reference"])
def test_parity_with_transformers(act, output, kernel, quick, gelu, ids, record_property):
    ref = quick if act == "quick_gelu" else gelu
    model, params = lidiff_model(ref, attention_kernel=kernel)
    got = model.apply({"params": params}, jnp.asarray(ids), output)
    want = torch_out(ref, ids, output)
    assert got.shape == (2, LENGTH, 64) and got.dtype == jnp.float32
    err = rel_err(got, want)
    record_property("rel_err", err)
    print(f"{act}/{output}/{kernel}: relative error {err:.2e}")
    assert err < TOL
    # the other output is a different tensor, so the comparison above can tell them apart
    other = model.apply({"params": params}, jnp.asarray(ids), "last" if output == "penultimate" else "penultimate")
    assert rel_err(other, want) > 1e-2


def test_padding_attention_mask_matches_transformers(quick, ids):
    mask = np.ones_like(ids)
    mask[0, 20:] = 0  # right padding, as a tokenizer with padding="max_length" and return_attention_mask gives
    mask[1, 50:] = 0
    model, params = lidiff_model(quick)
    got = model.apply({"params": params}, jnp.asarray(ids), "last", attention_mask=jnp.asarray(mask))
    want = torch_out(quick, ids, "last", attention_mask=mask)
    assert rel_err(got, want) < TOL
    unmasked = model.apply({"params": params}, jnp.asarray(ids), "last")
    assert rel_err(unmasked[0, 30:], want[0, 30:]) > 1e-2  # the mask did something where keys were hidden


def test_penultimate_equals_diffusers_sd2_truncated_model(gelu, ids):
    """diffusers' SD v2 text_encoder is the OpenCLIP tower with its last block dropped (num_hidden_layers - 1)
    read at last_hidden_state: the same numbers as the full tower's output="penultimate"."""
    full, params = lidiff_model(gelu)
    sd = {k: v for k, v in gelu.state_dict().items() if not k.startswith("encoder.layers.2.")}
    cut = CLIPTextTransformer(**clip_config_from_hf(hf_config("gelu", layers=2)))
    cut_params = clip_params_from_state_dict(sd, cut)
    a = full.apply({"params": params}, jnp.asarray(ids), "penultimate")
    b = cut.apply({"params": cut_params}, jnp.asarray(ids), "last")
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_attention_is_causal(quick, ids):
    model, params = lidiff_model(quick)
    changed = ids.copy()
    changed[:, 40] = (changed[:, 40] + 1) % VOCAB
    a = model.apply({"params": params}, jnp.asarray(ids))
    b = model.apply({"params": params}, jnp.asarray(changed))
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert float(jnp.abs(a[:, 40:] - b[:, 40:]).min(axis=-1).max()) > 0


def test_jit_and_init_hold_every_layer(quick, ids):
    model, params = lidiff_model(quick)
    fn = jax.jit(model.apply, static_argnames="output")
    for output in ("last", "penultimate"):
        np.testing.assert_allclose(fn({"params": params}, jnp.asarray(ids), output=output),
                                   model.apply({"params": params}, jnp.asarray(ids), output), rtol=1e-5, atol=1e-5)
    # init through the penultimate path still creates the last layer, so one tree serves both outputs
    init = jax.eval_shape(lambda k: model.init(k, jnp.asarray(ids), "penultimate"), jax.random.key(0))["params"]
    assert sorted(init["encoder"]) == ["layers_0", "layers_1", "layers_2"]
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(np.shape, params)


def test_bad_inputs_are_refused(quick):
    model, params = lidiff_model(quick)
    with pytest.raises(ValueError, match="exceed max_position_embeddings=77"):
        model.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="unknown output 'middle'"):
        model.apply({"params": params}, jnp.zeros((1, 77), jnp.int32), "middle")


# ---------------------------------------------------------------------------------------------- converter


def test_hf_folder_round_trip(tmp_path, quick, ids):
    quick.save_pretrained(tmp_path)
    model, params = load_clip_text_encoder(str(tmp_path))
    assert model.activation == "quick_gelu" and model.num_layers == 3 and model.hidden_size == 64
    got = model.apply({"params": params}, jnp.asarray(ids))
    ref_model, ref_params = lidiff_model(quick)
    np.testing.assert_array_equal(got, ref_model.apply({"params": ref_params}, jnp.asarray(ids)))
    assert rel_err(got, torch_out(quick, ids, "last")) < TOL


def test_sharded_folder_and_fp16_weights(tmp_path, gelu, ids):
    copy.deepcopy(gelu).half().save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, params = load_clip_text_encoder(str(tmp_path))
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
    got = model.apply({"params": params}, jnp.asarray(ids), "penultimate")
    assert rel_err(got, torch_out(gelu, ids, "penultimate")) < 1e-2  # float16 rounding of the weights


@pytest.mark.parametrize("layout", ["text_model.", "cond_stage_model.transformer.text_model."])
def test_prefixed_layouts(layout, quick, ids):
    sd = {layout + k: v.numpy() for k, v in quick.state_dict().items()}
    sd[layout + "embeddings.position_ids"] = np.arange(LENGTH)[None]  # buffer older checkpoints store
    if layout.startswith("cond_stage_model"):
        sd["model.diffusion_model.out.2.bias"] = np.zeros(4, np.float32)  # the rest of an LDM checkpoint
    model, params = lidiff_model(quick)
    got = model.apply({"params": clip_params_from_state_dict(sd, model)}, jnp.asarray(ids))
    np.testing.assert_array_equal(got, model.apply({"params": params}, jnp.asarray(ids)))


def test_strict_refusals(quick):
    cfg = clip_config_from_hf(quick.config)
    sd = {"text_model." + k: v.numpy() for k, v in quick.state_dict().items()}

    missing = dict(sd)
    del missing["text_model.encoder.layers.1.self_attn.q_proj.bias"]
    with pytest.raises(ConversionError, match=r"missing \(1\): encoder/layers_1/self_attn/q_proj/bias"):
        clip_params_from_state_dict(missing, cfg)

    extra = dict(sd, **{"text_model.encoder.layers.3.mlp.fc1.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected \(1\): encoder\.layers\.3\.mlp\.fc1\.weight"):
        clip_params_from_state_dict(extra, cfg)

    projection = dict(sd, **{"text_projection.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected \(1\): text_projection\.weight"):
        clip_params_from_state_dict(projection, cfg)

    wrong = dict(sd, **{"text_model.encoder.layers.0.mlp.fc2.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"shape mismatch \(1\): encoder\.layers\.0\.mlp\.fc2\.weight "
                                              r"\(64, 64\) -> encoder/layers_0/mlp/fc2/kernel expects \(128, 64\)"):
        clip_params_from_state_dict(wrong, cfg)

    with pytest.raises(ConversionError, match="missing"):  # a config with more layers than the weights
        clip_params_from_state_dict(sd, dict(cfg, num_layers=4))


def test_config_from_hf():
    cfg = hf_config("gelu")
    kw = clip_config_from_hf(cfg)
    assert kw == clip_config_from_hf(cfg.to_dict())
    assert kw == dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      max_position_embeddings=LENGTH, activation="gelu", layer_norm_eps=1e-5)
    assert clip_config_from_hf({"text_config": cfg.to_dict()}) == kw  # a full CLIPConfig dict
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        clip_config_from_hf(dict(cfg.to_dict(), hidden_act="relu"))
    with pytest.raises(ConfigError, match="lacks num_hidden_layers"):
        clip_config_from_hf({k: v for k, v in cfg.to_dict().items() if k != "num_hidden_layers"})


def test_missing_files_are_named(tmp_path, quick):
    with pytest.raises(MissingInputError, match="nowhere"):
        load_clip_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(MissingInputError, match="config.json"):
        load_clip_text_encoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(quick.config.to_dict()))
    with pytest.raises(MissingInputError, match="model.safetensors"):
        load_clip_text_encoder(str(tmp_path))
    save_file({"embeddings.token_embedding.weight": np.zeros((VOCAB, 64), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="missing"):
        load_clip_text_encoder(str(tmp_path))
