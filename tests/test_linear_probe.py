"""The linear probe's pieces without Ray: the transforms against torchvision, the training stream's plan, the heads'
training steps against an independent numpy implementation of the same math, the features' layout, the worker
placement, and the torch-free modules."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY
from PIL import Image

from vtp_ray.model import load_model
from vtp_ray.placement import PlacementError
from vtp_ray.probe import ProbeSettings
from vtp_ray.probe.data import epoch_plan
from vtp_ray.probe.heads import LinearHeads, make_optimizer, make_schedule, probe_features, train_step
from vtp_ray.probe.placement import worker_placement
from vtp_ray.probe.settings import cosine_factor
from vtp_ray.probe.transforms import random_crop_box, random_resized_crop, resize_center_crop

SHAPES = [(100, 80), (80, 300), (256, 256), (37, 500), (300, 224), (72, 72)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_the_evaluation_transform_is_torchvisions(width: int, height: int) -> None:
    from torchvision import transforms as T

    img = photo(width, height)
    bicubic = T.InterpolationMode.BICUBIC
    for resize, size in ((72, 64), (256, 224)):
        expected = np.asarray(T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(size)])(img))
        np.testing.assert_array_equal(resize_center_crop(img, resize, size), expected)


@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_the_training_crop_is_torchvisions_resized_crop_of_its_box(width: int, height: int) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = photo(width, height, seed=1)
    for seed in range(5):
        top, left, h, w = random_crop_box(width, height, np.random.default_rng(seed))
        expected = np.asarray(F.resized_crop(img, top, left, h, w, [64, 64], interpolation=InterpolationMode.BICUBIC))
        out = random_resized_crop(img, 64, np.random.default_rng(seed), flip=False)
        np.testing.assert_array_equal(out, expected)


def test_crop_boxes_are_drawn_as_torchvision_draws_them() -> None:
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = photo(400, 300)
    mine = [random_crop_box(400, 300, rng) for _ in range(3000)]
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    assert all(0 <= top <= 300 - h and 0 <= left <= 400 - w for top, left, h, w in mine)
    for statistic in (lambda b: b[2] * b[3] / 120_000, lambda b: b[3] / b[2], lambda b: b[0] + b[2] / 2):
        ours, reference = np.array([statistic(b) for b in mine]), np.array([statistic(b) for b in theirs])
        for q in (0.1, 0.5, 0.9):  # the same distribution: quantiles agree within sampling noise
            assert np.quantile(ours, q) == pytest.approx(np.quantile(reference, q), rel=0.06)
    # Nothing fits a 1 x 50 strip at ratio 3/4 .. 4/3: the fallback is the centered box clamped to the ratio range.
    assert random_crop_box(1, 50, rng) == (24, 0, 1, 1)
    flips = [random_resized_crop(photo(32, 32, 2), 16, np.random.default_rng(s), scale=(1, 1), ratio=(1, 1))
             for s in range(200)]  # fmt: skip
    mirrored = sum(np.array_equal(f, flips[0][:, ::-1]) for f in flips)
    assert 70 < mirrored < 130


def test_head_names_and_learning_rates_are_upstreams() -> None:
    heads = ProbeSettings().heads(workers=8)  # upstream's 8 GPUs x 128
    assert len(heads) == 26
    assert heads[0].name == "classifier_1_blocks_avgpool_True_lr_0_00004" and heads[0].lr == pytest.approx(4e-5)
    assert heads[-1].name == "classifier_4_blocks_avgpool_True_lr_0_40000" and heads[-1].lr == pytest.approx(0.4)
    small = ProbeSettings(batch_size=2).heads(workers=1)  # 5 decimals would merge 1e-5 * 2/256 and 2e-5 * 2/256
    assert len({h.name for h in small}) == 26
    with pytest.raises(ValueError, match="resize_size"):
        ProbeSettings(size=224, resize_size=200)
    with pytest.raises(ValueError, match="multiple of 16"):
        ProbeSettings(size=100)


def test_the_cosine_factor_is_torchs_cosine_annealing() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=37, eta_min=0)
    for step in range(37):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_factor(step, 37), abs=1e-12)
        optimizer.step()
        schedule.step()


def test_each_pass_of_the_stream_is_a_permutation_and_epochs_tile_it() -> None:
    sizes = np.ones(10, np.int64)
    epochs = [epoch_plan(sizes, seed=3, epoch=e, samples=4) for e in range(5)]  # 20 samples: two passes
    stream = np.concatenate([units for units, _, _ in epochs])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # each pass in its own order
    again = epoch_plan(sizes, seed=3, epoch=2, samples=4)
    np.testing.assert_array_equal(again[0], epochs[2][0])  # an epoch is rebuilt alone, identically
    assert not np.array_equal(epoch_plan(sizes, seed=4, epoch=0, samples=10)[0], stream[:10])


def test_shards_are_sliced_where_epochs_cut_them() -> None:
    sizes = np.array([5, 3, 7], np.int64)  # 15 samples in three files
    covered = []
    for e in range(3):  # epochs of 10: the second pass starts in epoch 1
        units, starts, stops = epoch_plan(sizes, seed=0, epoch=e, samples=10)
        assert int((stops - starts).sum()) == 10
        assert np.all((starts >= 0) & (starts < stops) & (stops <= sizes[units]))
        covered += [(int(u), i) for u, a, b in zip(units, starts, stops, strict=True) for i in range(a, b)]
    first_pass, second_pass = covered[:15], covered[15:30]
    everything = [(u, i) for u in range(3) for i in range(sizes[u])]
    assert sorted(first_pass) == everything and sorted(second_pass) == everything


def _numpy_reference(batches: list[tuple[np.ndarray, np.ndarray]], weights: list[np.ndarray],
                     biases: list[np.ndarray], widths: list[int], lrs: list[float], total: int,
                     momentum: float) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """SGD with momentum (torch's convention: buf = m * buf + grad; p -= lr * buf) and a cosine learning rate on
    each head's mean cross-entropy, written out in float64."""
    params = [(w.astype(np.float64), b.astype(np.float64)) for w, b in zip(weights, biases, strict=True)]
    buffers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(params)
    for step, (x, y) in enumerate(batches):
        factor = 0.5 * (1 + math.cos(math.pi * step / total))
        for h, ((w, b), width) in enumerate(zip(params, widths, strict=True)):
            inputs = x[:, -width:].astype(np.float64)
            logits = inputs @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            grad_w, grad_b = p.T @ inputs / len(y), p.mean(axis=0)
            if buffers[h] is None:
                buffers[h] = (grad_w, grad_b)
            else:
                buffers[h] = (momentum * buffers[h][0] + grad_w, momentum * buffers[h][1] + grad_b)
            params[h] = (w - lrs[h] * factor * buffers[h][0], b - lrs[h] * factor * buffers[h][1])
    return params


def test_training_steps_equal_an_independent_implementation_of_the_protocol() -> None:
    settings = ProbeSettings(epochs=2, epoch_length=3, batch_size=12, learning_rates=(0.5, 3.0, 20.0),
                             n_last_blocks=(1, 3), momentum=0.9)  # fmt: skip
    specs = settings.heads(workers=2)  # global batch 24: every rate x 24 / 256
    assert [s.lr for s in specs[:3]] == pytest.approx([0.5 * 24 / 256, 3.0 * 24 / 256, 20.0 * 24 / 256])
    dim, classes = 8, 5
    heads = LinearHeads(specs, dim, classes, init_std=0.01, seed=7)
    weights = [lin.weight.detach().numpy().copy() for lin in heads.linears]
    biases = [lin.bias.detach().numpy().copy() for lin in heads.linears]
    assert all(np.all(b == 0) for b in biases) and 0.007 < np.std(np.concatenate([w.ravel() for w in weights])) < 0.013
    optimizer = make_optimizer(heads, specs, settings)
    schedule = make_schedule(optimizer, settings.iterations)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(24, 4 * dim)).astype(np.float32), rng.integers(0, classes, 24))
               for _ in range(settings.iterations)]  # fmt: skip
    for x, y in batches:
        train_step(heads, optimizer, schedule, torch.from_numpy(x), torch.from_numpy(y))
    expected = _numpy_reference(batches, weights, biases, heads.widths, [s.lr for s in specs], settings.iterations,
                                settings.momentum)  # fmt: skip
    for linear, (w, b) in zip(heads.linears, expected, strict=True):
        # float32 against float64 over 6 steps: relative 1e-5 of the weights' scale
        np.testing.assert_allclose(linear.weight.detach().numpy(), w, rtol=0, atol=1e-5 * np.abs(w).max())
        np.testing.assert_allclose(linear.bias.detach().numpy(), b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-3))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed to 0 at the end


def test_the_features_are_upstreams_linear_input() -> None:
    model = load_model(TINY).model
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 80, 3), dtype=np.uint8))
    features = probe_features(model, images, max_blocks=2)
    from vtp_ray.normalize import normalize

    with torch.no_grad():
        outputs = model.get_intermediate_layers_feature(normalize(images), n=2, return_class_token=True)
        for n in (1, 2):  # upstream's create_linear_input(x_tokens_list, use_n_blocks=n, use_avgpool=True)
            last = outputs[-n:]
            expected = torch.cat([*(cls for _, cls in last), last[-1][0].mean(dim=1)], dim=-1)
            torch.testing.assert_close(features[:, -(n + 1) * 64 :], expected)
    assert features.shape == (3, 3 * 64) and features.dtype == torch.float32


def test_workers_are_one_per_accelerator_with_its_backend() -> None:
    ascend = [{"CPU": 32.0, "NPU": 8.0}, {"CPU": 32.0, "NPU": 8.0}]
    npu = worker_placement("auto", None, ascend, 0.5)
    assert (npu.workers, npu.backend, npu.resources, npu.use_gpu) == (16, "hccl", {"NPU": 1.0, "CPU": 1.0}, False)
    cuda = worker_placement("auto", None, [{"CPU": 16.0, "GPU": 4.0}], 0.5)
    assert (cuda.workers, cuda.backend, cuda.use_gpu, cuda.device_kind) == (4, "nccl", True, "cuda")
    cpu = worker_placement("auto", None, [{"CPU": 2.0}], 0.5)
    assert (cpu.workers, cpu.backend, cpu.resources) == (1, "gloo", {"CPU": 0.5})
    assert worker_placement({"NPU": 1, "CPU": 4}, 2, ascend, 0.5).resources == {"NPU": 1.0, "CPU": 4.0}
    with pytest.raises(PlacementError, match="no CPU for reading"):  # whole-CPU workers on 2 cores: a hang
        worker_placement({"CPU": 1}, 2, [{"CPU": 2.0}], 0.5)
    with pytest.raises(PlacementError, match="NPU"):
        worker_placement("npu", None, [{"CPU": 2.0}], 0.5)


@pytest.mark.slow  # a subprocess
def test_the_drivers_and_the_read_tasks_modules_do_not_import_torch() -> None:
    # The driver (job, data, features, the CLI) and Ray Data's read tasks (reads, transforms) run without torch.
    modules = ", ".join(f"vtp_ray.probe.{m}" for m in ("data", "reads", "job", "features", "transforms"))
    modules += ", vtp_ray.cli.probe"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


def test_a_ctrl_c_while_the_driver_waits_sets_a_flag_and_the_handler_comes_back():
    """The driver's wait for the training takes SIGINT as a flag it polls (Ray's blocking calls can drop a
    KeyboardInterrupt raised inside them); outside the wait Python's handler is back."""
    import signal

    from vtp_ray.probe.job import interrupt_flag

    # Python's own handler to start from: a process started in the background by a shell inherits SIGINT ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupt_flag() as interrupted:
            assert not interrupted.is_set()
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt here
            assert interrupted.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
