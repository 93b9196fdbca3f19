"""Evaluation: FID, precision/recall, KID and Inception Score of samples against a reference (``python -m
lidiff.eval``), and the pieces for in-training evaluation.

- ``evaluate(samples, reference, Settings(...))``: the command without flags (``lidiff.eval.evaluate``).
- ``fid_of_images(images, reference_stats, inception_variables)``: FID of a uint8 array, no I/O.
- ``EvalInputError``: every user mistake the command reports (message on stderr, exit status 1).
- ``autoencoder_metrics``: PSNR / SSIM / LPIPS / reconstruction FID / codebook usage of a first stage.
"""

from lidiff.eval.autoencoder import autoencoder_metrics
from lidiff.eval.errors import EvalInputError
from lidiff.eval.features import InceptionExtractor, extract, fid_of_images

__all__ = ["EvalInputError", "InceptionExtractor", "autoencoder_metrics", "extract", "fid_of_images"]
