"""taming-transformers PatchGAN weights -> lidiff ``NLayerDiscriminator`` variables.

Torch keys (``main.{idx}.*``, optionally under a prefix such as ``loss.discriminator.`` in a first-stage
``model.ckpt``) map as::

    main.{i}.weight / .bias              (conv)      -> params/main_{i}/kernel [4,4,I,O] / bias
    main.{i}.weight / .bias              (BatchNorm) -> params/main_{i}/scale / bias
    main.{i}.running_mean / running_var              -> batch_stats/main_{i}/mean / var
    main.{i}.num_batches_tracked                     -> dropped (flax uses a fixed momentum)

torch keeps the unbiased running variance and flax the biased one; both use it the same way in eval mode, so the
converted values are copied unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lidiff.convert.common import ConversionError, convert_state_dict, flatten, to_numpy_state_dict, unflatten

_STATS = {"running_mean": "mean", "running_var": "var"}


def discriminator_params_from_torch(
    state_dict: Mapping[str, Any], variables: Mapping[str, Any], *, prefix: str = ""
) -> dict:
    """Converts a taming ``NLayerDiscriminator`` state dict, strictly.

    Args:
      state_dict: ``{key: tensor or array}``; keys ``{prefix}main.{idx}.{weight,bias,running_mean,running_var,
        num_batches_tracked}``. Keys outside ``prefix`` are ignored (so a whole first-stage checkpoint can be
        passed with ``prefix='loss.discriminator.'``).
      variables: the target variables (arrays or ``jax.ShapeDtypeStruct``), e.g.
        ``jax.eval_shape(model.init, rng, x)``: ``{'params': ..., 'batch_stats': ...}`` (no ``batch_stats``
        for ``norm`` other than ``"batch"``).
      prefix: prefix stripped from the torch keys.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` (only the collections present in ``variables``), float32 numpy.

    Raises:
      ConversionError: naming every missing, unexpected or wrongly shaped tensor.
    """
    source = {k[len(prefix):]: v for k, v in to_numpy_state_dict(state_dict).items() if k.startswith(prefix)}
    params_sd: dict[str, np.ndarray] = {}
    stats: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in source.items():
        head, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if leaf in _STATS:
            module = head.replace(".", "_")
            stats[(module, _STATS[leaf])] = value.astype(np.float32)
        else:
            params_sd[key] = value
    out = {"params": convert_state_dict(params_sd, variables["params"])}

    target_stats = flatten(variables.get("batch_stats", {}))
    missing = ["/".join(p) for p in target_stats if p not in stats]
    unexpected = ["/".join(p) for p in stats if p not in target_stats]
    mismatched = [
        f"{'/'.join(p)} {stats[p].shape} (expected {tuple(target_stats[p].shape)})"
        for p in stats
        if p in target_stats and tuple(stats[p].shape) != tuple(target_stats[p].shape)
    ]
    if missing or unexpected or mismatched:
        raise ConversionError(
            "batch statistics do not match the discriminator: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}, shape mismatch {mismatched}"
        )
    if "batch_stats" in variables:
        out["batch_stats"] = unflatten(stats)
    return out
