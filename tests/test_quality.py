"""Reconstruction metrics against the references upstream VTP uses: pytorch-fid, lpips, torchmetrics.

Both sides of each comparison run the same seeded random weights (built here, saved to a temporary file) on the same
images. Tolerances (float32 networks, so never bit for bit across CPUs), with what one x86-64 CPU gave:
- FID Inception features: rtol 1e-4, atol 1e-4 x the largest feature (measured: identical);
  FID: rel 1e-3 (measured 4e-6 .. 2e-5: scipy's sqrtm of the singular covariances of 4 images).
- LPIPS-VGG / -AlexNet: rtol 1e-4, atol 1e-7 on values of ~5e-4 (measured 2e-7 relative).
- SSIM: 1e-6 against torchmetrics' module and a closed form; PSNR: closed forms to 1e-12.
pytorch-fid's reference network is loaded by pytorch-fid's own, unmodified code (from a primed torch.hub cache), not
through the loader swap that ``FidInceptionFeatures`` uses.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vtp_ray.metrics import (
    EVAL_INSTALL,
    FeatureStats,
    FidInceptionFeatures,
    Lpips,
    MissingEvalDependencyError,
    frechet_distance,
    frechet_distance_of_samples,
    psnr,
    require_eval_dependencies,
    save_random_fid_inception,
    save_random_lpips,
    ssim,
)

N, SIZE = 4, 64
FEATURES_RTOL = 1e-4
FID_RTOL = 1e-3
# The references' own warnings: pytorch-fid's sqrtm call (singular covariances of few images; scipy deprecations)
# and lpips' deprecated torchvision arguments.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Matrix is singular"),
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """References (smooth colour fields plus noise) and 'reconstructions' (blurred, noisy), uint8 (N, H, W, 3)."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (N, 3, 4, 4)))
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    ref = (smooth + torch.from_numpy(rng.normal(0, 12, smooth.shape))).clamp(0, 255).round()
    rec = F.avg_pool2d(ref, 3, 1, 1, count_include_pad=False) + torch.from_numpy(rng.normal(0, 4, ref.shape))
    as_u8 = lambda x: x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    return as_u8(ref), as_u8(rec)


def _write_pngs(directory: Path, images: np.ndarray) -> list[Path]:
    directory.mkdir()
    paths = [directory / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    return paths


# ------------------------------------------------------------------------------------------ rFID: pytorch-fid


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory: pytest.TempPathFactory, images: tuple[np.ndarray, np.ndarray]) -> dict:
    """Random FID Inception weights; pytorch-fid's own InceptionV3 loading them through its own (cached) loader."""
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    root = tmp_path_factory.mktemp("fid")
    weights = root / "fid_inception.pth"
    save_random_fid_inception(weights, seed=0)
    # pytorch-fid only loads from its URL through torch.hub, which takes a file already in the hub cache as is.
    hub = root / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    shutil.copy(weights, hub / "checkpoints" / Path(urlparse(FID_WEIGHTS_URL).path).name)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        reference_net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        torch.hub.set_dir(previous)
    ref, rec = images
    return {
        "weights": weights,
        "hub": hub,
        "reference_net": reference_net,
        "ref_pngs": _write_pngs(root / "ref", ref),
        "rec_pngs": _write_pngs(root / "rec", rec),
    }


def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_fid_inception_features_and_fid_match_pytorch_fid(fid_setup: dict, images: tuple) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    ours = FidInceptionFeatures(fid_setup["weights"])
    ref, rec = images
    ours_ref, ours_rec = ours(torch.from_numpy(ref)), ours(rec)  # tensors and numpy arrays alike
    # pytorch-fid's own pipeline from the PNG files, as upstream's rFID reads them.
    act = {
        k: get_activations(fid_setup[k], fid_setup["reference_net"], N, 2048, "cpu", 0)
        for k in ("ref_pngs", "rec_pngs")
    }
    assert ours_ref.shape == (N, 2048) and ours_ref.dtype == np.float32
    scale = np.abs(act["ref_pngs"]).max()
    assert scale > 0.1 and np.std(act["ref_pngs"], axis=0).max() > 1e-3  # random weights, yet informative features
    np.testing.assert_allclose(ours_ref, act["ref_pngs"], rtol=FEATURES_RTOL, atol=FEATURES_RTOL * scale)
    np.testing.assert_allclose(ours_rec, act["rec_pngs"], rtol=FEATURES_RTOL, atol=FEATURES_RTOL * scale)

    # Fréchet distance: ours (as the eval pipeline computes it: FeatureStats) against pytorch-fid's sqrtm route.
    # A full 2048-d sqrtm takes ~15 s: pytorch-fid's route on the first 256 dimensions; all 2048 through ours.
    a, b = FeatureStats(2048), FeatureStats(2048)
    a.add(ours_ref)
    b.add(ours_rec)
    theirs_full = frechet_distance(*_gaussian(act["ref_pngs"]), *_gaussian(act["rec_pngs"]))
    assert a.frechet_to(b) == pytest.approx(theirs_full, rel=FID_RTOL)
    expected = calculate_frechet_distance(*_gaussian(act["ref_pngs"][:, :256]), *_gaussian(act["rec_pngs"][:, :256]))
    assert expected > 0
    assert frechet_distance_of_samples(ours_ref[:, :256], ours_rec[:, :256]) == pytest.approx(expected, rel=FID_RTOL)


def test_weights_load_without_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_fid import inception

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr("urllib.request.urlopen", no_download)
    loader = inception.load_state_dict_from_url
    save_random_fid_inception(tmp_path / "fid.pth", seed=1)
    save_random_lpips(tmp_path / "lpips.pth")
    features = FidInceptionFeatures(tmp_path / "fid.pth")(np.zeros((1, 32, 48, 3), np.uint8))
    assert features.shape == (1, 2048) and np.isfinite(features).all()
    assert inception.load_state_dict_from_url is loader  # pytorch-fid's loader is back in place
    assert Lpips(tmp_path / "lpips.pth").net == "vgg"


def test_wrong_weight_files_are_refused(tmp_path: Path) -> None:
    save_random_lpips(tmp_path / "vgg.pth", "vgg")
    save_random_fid_inception(tmp_path / "fid.pth")
    with pytest.raises(ValueError, match="not a pytorch-fid FID Inception weights file"):
        FidInceptionFeatures(tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="holds LPIPS-vgg weights, not LPIPS-alex"):
        Lpips(tmp_path / "vgg.pth", net="alex")
    with pytest.raises(ValueError, match="no LPIPS heads"):
        Lpips(tmp_path / "fid.pth")
    with pytest.raises(ValueError, match="uint8"):
        FidInceptionFeatures(tmp_path / "fid.pth")(torch.zeros(1, 8, 8, 3))


# ---------------------------------------------------------------------------------------- LPIPS: lpips package


def _lpips_reference(weights: Path, net: str) -> torch.nn.Module:
    """The ``lpips`` package's LPIPS with our file's weights: trunk keys mapped onto its slices (same indices)."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    slice_of = {name.split(".")[2]: name.split(".")[1] for name in model.state_dict() if name.startswith("net.")}
    state = {}
    for key, value in torch.load(weights, weights_only=True).items():
        if key.startswith("features."):
            index, param = key.split(".")[1:]
            state[f"net.{slice_of[index]}.{index}.{param}"] = value
        else:
            state[key] = value
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("scaling_layer.", "lins.")) for k in result.missing_keys)
    return model.eval()


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_lpips_package(net: str, tmp_path: Path, images: tuple) -> None:
    weights = tmp_path / f"{net}.pth"
    save_random_lpips(weights, net, seed=3)
    reference = _lpips_reference(weights, net)
    ref, rec = images
    with torch.no_grad():
        expected = reference(
            *(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (ref, rec)), normalize=True
        )
    expected = expected.reshape(-1).double().numpy()
    ours = Lpips(weights)
    assert ours.net == net
    values = ours(ref, torch.from_numpy(rec))
    assert values.shape == (N,) and (values > 0).all()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ours(ref, ref), 0.0, atol=1e-7)
    # The lpips package's own state dict (net.slice*, lins.*, scaling_layer.*) is a valid weights file too.
    torch.save(reference.state_dict(), tmp_path / "module.pth")
    np.testing.assert_allclose(Lpips(tmp_path / "module.pth", net=net)(ref, rec), values, rtol=1e-6)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_loads_the_trained_heads_file(net: str, tmp_path: Path, images: tuple) -> None:
    """The heads the lpips package ships (``vgg.pth`` = upstream's) merged with a trunk state dict: a valid file."""
    import lpips

    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    save_random_lpips(tmp_path / "random.pth", net)
    trunk = {k: v for k, v in torch.load(tmp_path / "random.pth", weights_only=True).items() if k.startswith("feat")}
    torch.save({**trunk, **torch.load(heads, map_location="cpu", weights_only=True)}, tmp_path / "merged.pth")
    values = Lpips(tmp_path / "merged.pth", net=net)(*images)
    assert values.shape == (N,) and np.isfinite(values).all() and (values > 0).all()


# ------------------------------------------------------------------------------------------------ SSIM, PSNR


def test_ssim_matches_torchmetrics_as_upstream_calls_it(images: tuple) -> None:
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    ref, rec = images
    values = ssim(torch.from_numpy(ref), rec)
    assert values.shape == (N,) and (values < 1).all() and (values > 0.2).all()
    metric = StructuralSimilarityIndexMeasure(data_range=1.0)
    expected = metric(*(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (ref, rec))).item()
    assert values.mean() == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(ssim(ref, ref), 1.0, atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Flat images: every window has zero variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 1)^2.
    a, b = np.full((1, 24, 24, 3), 100, np.uint8), np.full((1, 24, 24, 3), 140, np.uint8)
    x, y, c1 = 100 / 255, 140 / 255, 0.01**2
    assert ssim(a, b)[0] == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), abs=1e-6)


def test_psnr_known_answers() -> None:
    rng = np.random.default_rng(4)
    ref = rng.integers(20, 236, (3, 32, 32, 3), dtype=np.uint8)
    assert np.isinf(psnr(ref, ref)).all()
    # +-5 on every pixel (random signs): MSE = 25 exactly.
    noisy = (ref.astype(np.int16) + rng.choice([-5, 5], ref.shape)).astype(np.uint8)
    np.testing.assert_allclose(psnr(ref, noisy), 10 * np.log10(255**2 / 25), rtol=1e-12)
    # One value off by 255 in a 4x4x3 image: MSE = 255^2 / 48, PSNR = 10 log10(48).
    black, one = np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8)
    one[0, 1, 2, 0] = 255
    assert psnr(black, one)[0] == pytest.approx(10 * math.log10(48), rel=1e-12)
    # Float images on the 0-255 scale and tensors give the same numbers.
    np.testing.assert_allclose(psnr(torch.from_numpy(ref), noisy.astype(np.float32)), psnr(ref, noisy), rtol=1e-12)


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_identical_gaussians_is_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    sigma = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), sigma, a.mean(0), sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated basis: the distance does not change.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_singular_and_one_dimensional() -> None:
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(5)
    # Rank-deficient covariances (fewer samples than dimensions, as rFID on few images): finite, >= 0.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    d = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert math.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))


@pytest.mark.parametrize("n", [5, 50])
def test_frechet_of_samples_matches_covariance_route(n: int) -> None:
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 8)), rng.normal(1.0, 2.0, size=(n + 3, 8))
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance_of_samples(x, y) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert frechet_distance_of_samples(x, x) == pytest.approx(0.0, abs=1e-9)
    # FeatureStats picks the sample route below dim vectors and the covariance route above: the same answer.
    a, b = FeatureStats(8), FeatureStats(8)
    a.add(x)
    b.add(y)
    assert a.frechet_to(b) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_frechet_matches_pytorch_fid_on_full_rank_covariances() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(200, 16)), rng.normal(0.3, 1.5, size=(300, 16)) @ rng.normal(size=(16, 16))
    args = (*_gaussian(x), *_gaussian(y))
    assert frechet_distance(*args) == pytest.approx(calculate_frechet_distance(*args), rel=1e-9)


def test_feature_stats_match_numpy() -> None:
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(40, 5)).astype(np.float32)
    stats = FeatureStats(5)
    for part in np.array_split(x, 3):
        stats.add(part)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(5).mean_cov()


# ------------------------------------------------------------------------------------------ dependencies


def test_eval_dependencies_present() -> None:
    require_eval_dependencies({"psnr", "ssim", "lpips", "rfid"})
    require_eval_dependencies([])


@pytest.mark.parametrize(
    ("absent", "metrics", "named"),
    [
        (("torchmetrics",), {"psnr", "ssim"}, "torchmetrics (for ssim)"),
        (("pytorch_fid", "pytorch_fid.inception"), {"ssim", "rfid"}, "pytorch-fid (for rfid)"),
        (("torchvision",), {"lpips", "rfid"}, "torchvision (for lpips, rfid)"),
    ],
)
def test_missing_eval_dependency_gives_the_install_line(
    monkeypatch: pytest.MonkeyPatch, absent: tuple[str, ...], metrics: set[str], named: str
) -> None:
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)  # an absent package: import raises ImportError
    with pytest.raises(MissingEvalDependencyError, match=r"pip install 'vtp-ray\[eval\]'") as caught:
        require_eval_dependencies(metrics)
    assert isinstance(caught.value, ImportError) and named in str(caught.value)
    assert EVAL_INSTALL == "pip install 'vtp-ray[eval]'"
    require_eval_dependencies({"psnr"})  # PSNR needs nothing optional
    with pytest.raises(ValueError, match="unknown metrics"):
        require_eval_dependencies({"fid"})
