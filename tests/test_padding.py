"""Features padded once for the CUDA Gram kernel (ntk_fast.ntk.padding), checked on the CPU: the padded
copies, that every row panel of a padded matrix needs no further copy, that the panel loops of
ntk_fast.ntk.stream and ntk_fast.ntk.empirical hand the op only such slices, and that the Gram is unchanged."""
import functools

import pytest
import torch

import ntk_fast._C  # noqa: F401  (registers the ops)
from ntk_fast.ntk import empirical, stream
from ntk_fast.ntk.padding import needs_padding, pad_features, padded_width
from ntk_fast.ops import gram as gram_ops


def _ref(A1, D1, A2, D2, scales):
    return sum(s * (a1 @ a2.T) * (d1 @ d2.T) for a1, d1, a2, d2, s in zip(A1, D1, A2, D2, scales))


@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.float64, 2)])
def test_padded_width(dtype, vec):
    item = torch.empty((), dtype=dtype).element_size()
    for k in range(0, 40):
        kp = padded_width(k, item)
        assert kp % vec == 0 and kp >= max(k, vec) and kp - max(k, 1) < vec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pad_features_copies(dtype, gen):
    n = 23
    buf = torch.randn(n * 48 + 1, generator=gen, dtype=dtype)
    ts = [torch.randn(n, 1, generator=gen, dtype=dtype),          # the last layer's D: width 1
          torch.randn(n, 13, generator=gen, dtype=dtype),
          torch.randn(48, n, generator=gen, dtype=dtype).T,       # non-contiguous
          buf[1:].view(n, 48),                                    # contiguous but not 16-byte aligned
          torch.randn(n, 16, generator=gen, dtype=dtype)]         # already fine
    out = pad_features(ts, always=True)
    assert out[4] is ts[4]
    for t, p in zip(ts, out):
        k = t.shape[1]
        assert p.shape == (n, padded_width(k, t.element_size()))
        assert torch.equal(p[:, :k], t) and not p[:, k:].any()
        assert not needs_padding(p)
        for r0 in (0, 1, 7, n - 1):        # every row panel of the padded matrix goes to the kernel as is
            assert not needs_padding(p[r0:]) and not needs_padding(p[r0:r0 + 5])
    assert needs_padding(ts[1][3:]) and needs_padding(ts[3])
    # CPU tensors are left alone unless forced.
    assert all(a is b for a, b in zip(pad_features(ts), ts))


def test_padding_keeps_the_gram(gen):
    n1, n2 = 19, 11
    A1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (5, 3)]
    D1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (3, 1)]
    A2 = [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (5, 3)]
    D2 = [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (3, 1)]
    pad = functools.partial(pad_features, always=True)
    got = gram_ops.gram(pad(A1), pad(D1), pad(A2), pad(D2), [0.5, 2.0])
    torch.testing.assert_close(got, _ref(A1, D1, A2, D2, [0.5, 2.0]), rtol=1e-12, atol=1e-12)


def _spy(monkeypatch, module, name, seen):
    """Wrap module.name so that every feature tensor of every call is recorded as needing a copy or not."""
    orig = getattr(module, name)

    def wrapper(*args, **kwargs):
        for lst in args:
            if isinstance(lst, (list, tuple)):
                seen.extend(needs_padding(t) for t in lst if isinstance(t, torch.Tensor))
        return orig(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("symmetric", [True, False])
def test_stream_panels_get_padded_slices(monkeypatch, gen, symmetric):
    n1, n2 = 29, 17
    A1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (5, 7)]
    D1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (7, 1)]
    A2 = A1 if symmetric else [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (5, 7)]
    D2 = D1 if symmetric else [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (7, 1)]
    monkeypatch.setattr(stream, "pad_features", functools.partial(pad_features, always=True))
    seen = []
    _spy(monkeypatch, stream, "_compute_panel", seen)
    out = stream.gram_streamed(A1, D1, None if symmetric else A2, None if symmetric else D2, [1.0, 0.5],
                               panel_rows=6)
    assert seen and not any(seen)
    torch.testing.assert_close(out, _ref(A1, D1, A2, D2, [1.0, 0.5]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sym", [True, False])
def test_empirical_panels_get_padded_slices(monkeypatch, gen, sym):
    n1, n2 = 21, 13
    A1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (3, 9)]
    D1 = [torch.randn(n1, k, generator=gen, dtype=torch.float64) for k in (9, 1)]
    A2 = A1 if sym else [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (3, 9)]
    D2 = D1 if sym else [torch.randn(n2, k, generator=gen, dtype=torch.float64) for k in (9, 1)]
    monkeypatch.setattr(empirical, "pad_features", functools.partial(pad_features, always=True))
    seen = []
    _spy(monkeypatch, empirical._ops, "gram", seen)
    out = torch.full((A1[0].shape[0], A2[0].shape[0]), float("nan"), dtype=torch.float64)
    empirical._panels(A1, D1, A2, D2, sym, out, 4, False, "highest")
    assert seen and not any(seen)
    torch.testing.assert_close(out, _ref(A1, D1, A2, D2, [1.0, 1.0]), rtol=1e-12, atol=1e-12)
