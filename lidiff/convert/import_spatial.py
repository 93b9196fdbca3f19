"""The spatial conditioning of an imported LDM (``concat`` mode: a map concatenated to x_t), read from its tensors.

The UNet takes ``in_channels = L + E``: the L latent channels of the first stage plus E concatenated ones. Three
released CompVis models condition this way (``lidiff.models.spatial_conditioning`` rebuilds each):

====================================  =============================================  ==================================
source                                what it holds                                  lidiff ``diffusion.conditioning``
====================================  =============================================  ==================================
semantic_synthesis{256,512}           ``cond_stage_model.channel_mapper.weight``     ``semantic``: num_classes = in,
                                      [out, in, 1, 1] (SpatialRescaler's 1x1 map)    map_channels = out (E = out)
bsr_sr                                no cond-stage tensors (Identity), E = 3        ``superres``: sr_factor = f (the
                                                                                 low-res image is latent-sized)
inpainting_big                        no cond-stage tensors (``__is_first_stage__``  ``inpainting`` (the masked image's
                                      + the resized mask), E = L + 1                 encoding, then the mask)
====================================  =============================================  ==================================

Without cond-stage tensors the kind is read from E alone; where both rules fit (L = 2) or neither, the import
stops and names ``--config.diffusion.conditioning.kind=`` with the values that fit. A kind the user gives wins over
the rules. Settings the tensors cannot show (superres ``degradation``, inpainting ``mask_kind``) keep the config
defaults: they only shape training inputs.
"""

from __future__ import annotations

from typing import Any, Mapping

from lidiff.convert.common import ConversionError

KIND_FLAG = "--config.diffusion.conditioning.kind"
RGB = 3  # channels of a low-res image concatenated as it is (CompVis bsr_sr's Identity cond stage)


def fitting_kinds(extra: int, latent_channels: int) -> list[str]:
    """The spatial kinds whose concat width equals ``extra`` without cond-stage tensors: superres (3 channels),
    inpainting (latent_channels + 1)."""
    return [kind for kind, width in (("superres", RGB), ("inpainting", latent_channels + 1)) if width == extra]


def concat_fields(in_channels: int, latent_channels: int, factor: int,
                  user_kind: Any = None) -> tuple[dict[str, Any], list[str]]:
    """A UNet with no cond-stage tensors -> ``(conditioning fields, report lines)``; ``({}, [])`` when the channel
    counts do not decide (``undetermined`` then says what to set).

    in_channels: the UNet's input channels; latent_channels: the first stage's (``embed_dim``); factor: its
    downsampling factor f. user_kind: ``--config.diffusion.conditioning.kind`` when given (it wins).
    """
    extra = in_channels - latent_channels
    counts = f"the UNet takes {in_channels} input channels = {latent_channels} latent + {extra} concatenated"
    if user_kind is not None:
        kind, origin = user_kind, f"from {KIND_FLAG}"
        if kind not in ("superres", "inpainting", "semantic"):
            return {}, []
        fits = fitting_kinds(extra, latent_channels)
        if kind not in fits and fits:
            origin += f"; the channel counts alone would give {' or '.join(fits)}"
    else:
        fits = fitting_kinds(extra, latent_channels)
        if extra <= 0 or len(fits) != 1:
            return {}, []
        kind, origin = fits[0], "no cond-stage tensors"
    if kind == "superres":
        return dict(kind=kind, mode="concat", sr_factor=factor), [
            f"  superres ({origin}): {counts}, a latent-sized low-res RGB image (CompVis bsr_sr's Identity cond "
            f"stage); sr_factor {factor} = the first stage's f; degradation stays the config default (it only makes "
            "training inputs)"]
    if kind == "inpainting":
        return dict(kind=kind, mode="concat"), [
            f"  inpainting ({origin}): {counts} = the first stage's encoding of the masked image ({latent_channels}) "
            "+ the mask resized to the latent (1) (CompVis inpainting_big's __is_first_stage__); mask_kind stays the "
            "config default (it only makes training masks)"]
    return dict(kind=kind, mode="concat", num_classes=extra, map_channels=0), [
        f"  semantic ({origin}): {counts}: a one-hot map of num_classes {extra} classes, halved to the latent "
        "size, with no 1x1 channel map (the file has no cond_stage_model.channel_mapper.weight)"]


def semantic_lines(fields: Mapping[str, Any], in_channels: int, latent_channels: int, factor: int) -> list[str]:
    """Report lines of a semantic model whose ``fields`` come from ``channel_mapper.weight``; refuses a UNet whose
    extra input channels are not the map's width (``ConversionError``)."""
    extra, out, classes = in_channels - latent_channels, fields["map_channels"], fields["num_classes"]
    halvings = factor.bit_length() - 1
    if extra != out:
        raise ConversionError(f"cond_stage_model.channel_mapper.weight maps {classes} classes to {out} channels, but "
                              f"the UNet takes {in_channels} input channels = {latent_channels} latent + {extra}: "
                              "the file is not one semantic-synthesis model")
    return [f"  semantic (from cond_stage_model.channel_mapper.weight [{out}, {classes}, 1, 1], a SpatialRescaler's "
            f"1x1 map): num_classes {classes}, map_channels {out}; the one-hot map is halved {halvings} time"
            f"{'s' if halvings != 1 else ''} (the first stage's f={factor}), then mapped; data.source "
            "segmentation_folder"]


def undetermined(in_channels: int, latent_channels: int) -> str:
    """What the user must set when the channel counts of a UNet without cond-stage tensors decide no kind (for the
    import's list of missing settings): the flag and the values that fit."""
    extra = in_channels - latent_channels
    head = (f"what the UNet's extra input channels are ({in_channels} = {latent_channels} latent + {extra}; the file "
            "holds no cond_stage_model.* tensors to say): ")
    if extra < 0:
        return (f"the UNet takes {in_channels} input channels, fewer than the first stage's {latent_channels} latent "
                "channels: the two do not belong together (give --config with the model)")
    fits = fitting_kinds(extra, latent_channels)
    if len(fits) > 1:
        return head + (f"superres (a latent-sized low-res RGB image, {RGB} channels) and inpainting (the masked "
                       f"image's encoding + the mask, {latent_channels} + 1) both fit: "
                       + " or ".join(f"{KIND_FLAG}={kind}" for kind in fits))
    return head + (f"neither superres ({RGB} channels) nor inpainting ({latent_channels} + 1 = {latent_channels + 1}) "
                   f"fits; a one-hot segmentation map of {extra} classes without a channel map does: "
                   f"{KIND_FLAG}=semantic (num_classes {extra}), or give --config with the model")


def semantic_params_from_compvis(cond: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """``cond_stage_model.*`` without prefix, ``{"channel_mapper.weight": [out, in, 1, 1]}`` -> the params of
    ``SemanticConditioning``, ``{"channel_mapper": {"kernel": [1, 1, in, out]}}`` (float32 numpy), strictly: any
    other tensor, or a target without the map (``map_channels`` 0), raises ``ConversionError`` naming it.
    target: ``jax.eval_shape(conditioner.init, rng)``."""
    from lidiff.convert.common import convert_state_dict

    return convert_state_dict(cond, target)
