"""Reconstruction quality metrics, computed as upstream VTP's ``tools/test_reconstruction_hf.py`` computes them.

=========  =====================================================================================================
PSNR       ``psnr``: per image, ``10 log10(255^2 / MSE)`` on 0-255 pixels
SSIM       ``ssim``: torchmetrics' SSIM (11x11 Gaussian, sigma 1.5) with ``data_range=1.0`` on [0, 1], per image
LPIPS      ``Lpips``: v0.1, VGG16 trunk (upstream's LightningDiT / taming LPIPS = ``lpips.LPIPS(net="vgg")``);
           AlexNet (``lpips``' own default) when given AlexNet weights
rFID       ``FidInceptionFeatures``: pytorch-fid's FID Inception itself (2048-d pool3), then the Fréchet distance
           of the two feature Gaussians (``FeatureStats``, ``frechet_distance``)
=========  =====================================================================================================

Images are uint8 ``(N, H, W, 3)``: reconstructions are quantized to uint8 before any metric, as a saved PNG is.
Upstream computes rFID from its saved PNGs too (written with ``(x * 255).astype(uint8)``, which truncates where
vtp-ray rounds to nearest), and PSNR, SSIM and LPIPS on the float decoder output, where ours see the uint8 image:
at most one level per pixel apart.

Network weights are never downloaded: they come from local files (``VTP_INCEPTION_WEIGHTS`` /
``VTP_LPIPS_WEIGHTS`` or explicit paths). torchmetrics, torchvision and pytorch-fid come with ``vtp-ray[eval]``,
are imported only by what uses them, and ``require_eval_dependencies`` checks them before work starts.
"""

from .dependencies import EVAL_INSTALL, METRICS, MissingEvalDependencyError, require_eval_dependencies
from .frechet import FeatureStats, frechet_distance, frechet_distance_of_samples
from .inception import INCEPTION_DIM, FidInceptionFeatures, save_random_fid_inception
from .perceptual import Lpips, LpipsNet, save_random_lpips
from .pixel import psnr, ssim
from .weights import INCEPTION_ENV, LPIPS_ENV, MissingWeightsError, resolve_weights

__all__ = [
    "EVAL_INSTALL",
    "INCEPTION_DIM",
    "INCEPTION_ENV",
    "LPIPS_ENV",
    "METRICS",
    "FeatureStats",
    "FidInceptionFeatures",
    "Lpips",
    "LpipsNet",
    "MissingEvalDependencyError",
    "MissingWeightsError",
    "frechet_distance",
    "frechet_distance_of_samples",
    "psnr",
    "require_eval_dependencies",
    "resolve_weights",
    "save_random_fid_inception",
    "save_random_lpips",
    "ssim",
]
