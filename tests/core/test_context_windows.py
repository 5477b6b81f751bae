"""core/context_windows.py: the uniform schedules equal AnimateDiff-Evolved's (test vectors executed from ADE's
functions, lightning-breadth.md section 4.1), the fuse weights its pyramid, and fusing is the weighted mean."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core import context_windows as C


def _span(a, b):
    return list(range(a, b + 1))


def _wrap(start, end, frames, length=16):
    return [(start + t) % frames for t in range(length)]


def test_ordered_halving():
    assert [C.ordered_halving(k) for k in range(6)] == [0, 0.5, 0.25, 0.75, 0.125, 0.625]


@pytest.mark.parametrize("frames, step, expected", [
    (17, 0, [_span(0, 15), _span(1, 16)]),
    (24, 0, [_span(0, 15), _span(8, 23)]),
    (24, 1, [_span(8, 23), _span(0, 15)]),
    (24, 2, [_span(6, 21), _span(8, 23), _span(0, 15)]),
    (30, 0, [_span(0, 15), _span(12, 27), _span(14, 29)]),
    (32, 0, [_span(0, 15), _span(12, 27), _span(16, 31)]),
    (32, 1, [_span(16, 31), _span(0, 15), _span(8, 23)]),
    (40, 0, [_span(0, 15), _span(12, 27), _span(24, 39)]),
    (48, 0, [_span(0, 15), _span(12, 27), _span(24, 39), _span(32, 47)]),
    (48, 1, [_span(24, 39), _span(32, 47), _span(0, 15), _span(12, 27)]),
])
def test_standard_windows_equal_ade(frames, step, expected):
    assert C.uniform_standard(frames, 16, 4, step) == expected


@pytest.mark.parametrize("frames, step, expected", [
    (17, 0, [_span(0, 15), _wrap(12, 10, 17)]),
    (24, 0, [_span(0, 15), _wrap(12, 3, 24)]),
    (24, 1, [_wrap(12, 3, 24), _span(0, 15)]),
    (30, 0, [_span(0, 15), _span(12, 27), _wrap(24, 9, 30)]),
    (32, 1, [_span(16, 31), _wrap(28, 11, 32), _span(8, 23)]),
    (48, 0, [_span(0, 15), _span(12, 27), _span(24, 39), _wrap(36, 3, 48)]),
])
def test_looped_windows_equal_ade(frames, step, expected):
    assert C.uniform_looped(frames, 16, 4, step) == expected


def test_closed_loop_adds_the_wrapping_window():
    assert C.uniform_looped(40, 16, 4, 0, closed_loop=True)[-1] == _wrap(36, 11, 40)


def test_pyramid_weights():
    assert C.fuse_weights("pyramid", 16).tolist() == [*range(1, 9), *range(8, 0, -1)]
    assert C.fuse_weights("pyramid", 15).tolist() == [*range(1, 9), *range(7, 0, -1)]
    assert C.fuse_weights("flat", 4).tolist() == [1, 1, 1, 1]


def test_fusion_is_the_weighted_mean_over_windows():
    frames = 24
    x = torch.randn(2, 4, frames, 3, 3)
    context = torch.arange(2 * frames, dtype=torch.float32).view(-1, 1, 1)
    calls = []

    def forward(x_window, t, context_window):  # a prediction that shows which window made it
        calls.append(x_window.shape[2])
        return x_window * 2 + len(calls)

    fused = C.windowed(forward, frames=frames, length=16, overlap=4, schedule="standard", fuse="pyramid",
                       step_of=lambda: 0)(x, torch.tensor([1.0]), context)
    windows = C.uniform_standard(frames, 16, 4, 0)
    expected_total, weight = torch.zeros_like(x), torch.zeros(frames)
    for number, window in enumerate(windows, start=1):
        w = C.fuse_weights("pyramid", 16)
        expected_total[:, :, window] += (x[:, :, window] * 2 + number) * w.view(1, 1, -1, 1, 1)
        weight[window] += w
    torch.testing.assert_close(fused, expected_total / weight.view(1, 1, -1, 1, 1))
    assert calls == [16, 16]


def test_bad_overlap_is_refused():
    from flipbook_pack.core.errors import InvalidSettingError

    with pytest.raises(InvalidSettingError, match="overlap 16"):
        C.uniform_standard(32, 16, 16, 0)


def test_freenoise_shuffles_blocks_as_ade():
    """40 frames, length 16, overlap 4 (lightning-breadth.md 4.3, verified on ADE): frames 16-27 are a permutation of
    frames 0-11, frames 28-39 a permutation of (the already shuffled) frames 12-23."""
    noise = torch.randn(1, 4, 40, 2, 2)
    out = C.freenoise(noise, length=16, overlap=4, seed=7)
    assert torch.equal(out[:, :, :16], noise[:, :, :16])

    def is_permutation(block, source):
        matches = [[torch.equal(block[:, :, i], source[:, :, j]) for j in range(source.shape[2])]
                   for i in range(block.shape[2])]
        return all(sum(row) == 1 for row in matches) and all(sum(col) == 1 for col in zip(*matches))

    assert is_permutation(out[:, :, 16:28], noise[:, :, 0:12])
    assert is_permutation(out[:, :, 28:40], out[:, :, 12:24])
    assert torch.equal(C.freenoise(noise, length=16, overlap=4, seed=7), out)  # the seed decides the order
