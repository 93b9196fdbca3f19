"""First-stage (autoencoder) metrics over a validation split: PSNR, SSIM, LPIPS, reconstruction FID, codebook use.

The paper's Tab. 8 columns. ``autoencoder_metrics`` takes the model as a function, so it does not care how the
autoencoder was loaded (that is ``lidiff.runs``' job)::

    reconstruct(x) -> (x_rec, indices)   x, x_rec: float32 [B, H, W, 3] in [-1, 1]; indices: int [B, h, w] codes
                                         of a VQ model, or None for KL models
    lpips(x, y) -> [B]                   e.g. ``functools.partial(LPIPS().apply, {"params": lpips_params})``

PSNR and SSIM are computed on the uint8 images (what is saved and seen), LPIPS on the float ones. An image
reconstructed exactly (infinite PSNR) counts as 100 dB in the PSNR mean.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from lidiff.data.transforms import to_uint8
from lidiff.eval.features import InceptionExtractor
from lidiff.metrics.fid import MomentAccumulator, frechet_distance
from lidiff.metrics.reconstruction import code_counts, codebook_usage, psnr, ssim
from lidiff.models.inception import NUM_FEATURES


def autoencoder_metrics(
    reconstruct: Callable[[np.ndarray], tuple[Any, Any]],
    batches: Iterable[np.ndarray],
    *,
    lpips: Callable[[Any, Any], Any] | None = None,
    extractor: InceptionExtractor | None = None,
    num_codes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Means over every image of ``batches`` (float32 [B, H, W, 3] in [-1, 1], e.g. a validation loader's images).

    Returns ``{"num_images", "psnr", "ssim"}`` plus ``"lpips"`` (with ``lpips``), ``"rfid"`` (reconstructions
    against the originals, with ``extractor``; needs >= 2 images, biased below 2048) and ``"codebook"``
    (``{"perplexity", "usage", "num_used"}``, with ``num_codes`` and a VQ model's indices).
    """
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    counts = np.zeros(num_codes, np.int64) if num_codes else None
    real_acc, fake_acc = MomentAccumulator(NUM_FEATURES), MomentAccumulator(NUM_FEATURES)
    for x in tqdm(batches, desc="autoencoder", unit="batch", disable=not progress, leave=False):
        x = np.asarray(x, np.float32)
        x_rec, indices = reconstruct(x)
        x_rec = np.clip(np.asarray(x_rec, np.float32), -1.0, 1.0)
        real, fake = to_uint8(x), to_uint8(x_rec)
        sums["psnr"] += float(np.sum(np.minimum(np.asarray(psnr(real, fake)), 100.0)))  # identical: capped at 100
        sums["ssim"] += float(np.sum(np.asarray(ssim(real, fake))))
        if lpips is not None:
            sums["lpips"] += float(np.sum(np.asarray(lpips(x, x_rec))))
        if extractor is not None:  # originals and reconstructions share device calls
            both = np.concatenate([real, fake])
            feats = np.concatenate([extractor(both[i : i + extractor.batch_size])[0]
                                    for i in range(0, len(both), extractor.batch_size)])
            real_acc.update(feats[: len(real)])
            fake_acc.update(feats[len(real) :])
        if counts is not None and indices is not None:
            counts += code_counts(np.asarray(indices), num_codes)
        n += len(x)
    if n == 0:
        raise ValueError("autoencoder_metrics got no images")
    out: dict[str, Any] = {"num_images": n, "psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n}
    if lpips is not None:
        out["lpips"] = sums["lpips"] / n
    if extractor is not None:
        (mu1, s1), (mu2, s2) = real_acc.stats(), fake_acc.stats()
        out["rfid"] = frechet_distance(mu1, s1, mu2, s2)
    if counts is not None:
        out["codebook"] = codebook_usage(counts)
    return out


def evaluate_autoencoder(workdir: str, reference: str, *, num_images: int | None, batch_size: int, seed: int,
                         variables: Any | None, lpips_weights: str | None, mesh: Any = None,
                         progress: bool = True) -> dict[str, Any]:
    """The Tab. 8 columns of the first stage in run directory ``workdir`` over the images of the dataset config
    ``reference`` (``configs/x.py[:arg]``; point its data at the validation split, e.g. with a config whose
    ``data.split`` or ``data.path`` names it), through lidiff's data pipeline. ``variables``: Inception
    variables for rFID (None: no rFID). ``lpips_weights``: converted LPIPS file (None: no LPIPS).
    """
    import functools

    import jax

    from lidiff.convert.lpips_weights import load_lpips_params
    from lidiff.eval.errors import EvalInputError
    from lidiff.eval.sources import DatasetImages
    from lidiff.models.lpips import LPIPS
    from lidiff.runs import load_autoencoder

    first_stage, params, step = load_autoencoder(workdir)
    model = first_stage.model
    if not reference.partition(":")[0].endswith(".py"):
        raise EvalInputError(f"--reference={reference}: the autoencoder is evaluated on a dataset config "
                             "(configs/x.py) whose data is the validation split")
    data = DatasetImages(reference, num_images, seed)

    if first_stage.kind == "vq":
        def apply(p, x):
            x_rec, q = model.apply({"params": p}, x)
            return x_rec, q.indices
    else:
        def apply(p, x):
            return model.apply({"params": p}, x, sample_posterior=False)[0], None
    apply = jax.jit(apply)
    lpips = None
    if lpips_weights:
        try:
            lpips_params = load_lpips_params(lpips_weights)
        except FileNotFoundError as e:
            raise EvalInputError(str(e)) from None
        lpips = jax.jit(functools.partial(LPIPS().apply, {"params": lpips_params}))
    extractor = None if variables is None else InceptionExtractor(variables, mesh, batch_size)
    from lidiff.data.transforms import to_float

    batches = (to_float(images) for images in data.batches(batch_size))
    out = autoencoder_metrics(lambda x: apply(params, x), batches, lpips=lpips, extractor=extractor,
                              num_codes=model.n_embed if first_stage.kind == "vq" else None, progress=progress)
    return {"autoencoder": workdir, "kind": first_stage.kind, "checkpoint_step": step, "reference": data.describe(),
            **out}
