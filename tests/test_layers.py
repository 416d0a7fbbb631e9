"""upfirdn2d and the StyleGAN2 FIR helpers against direct implementations."""
import numpy as np
import pytest

from grain_jax import layers


def upfirdn2d_direct(x, k, up, down, pad):
  """Textbook upfirdn2d on NHWC: zero-insert, pad/crop, true 2-D convolution, stride."""
  n, h, w, c = x.shape
  u = np.zeros((n, h * up, w * up, c), x.dtype)
  u[:, ::up, ::up] = x
  p0, p1 = pad
  u = np.pad(u, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
  u = u[:, max(-p0, 0):u.shape[1] - max(-p1, 0), max(-p0, 0):u.shape[2] - max(-p1, 0)]
  kh, kw = k.shape
  oh, ow = u.shape[1] - kh + 1, u.shape[2] - kw + 1
  out = np.zeros((n, oh, ow, c), np.float64)
  for i in range(oh):
    for j in range(ow):
      win = u[:, i:i + kh, j:j + kw]
      out[:, i, j] = np.einsum("nhwc,hw->nc", win, k[::-1, ::-1])  # convolution: flipped
  return out[:, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (2, 2)),
                                         (1, 2, (1, 1)), (2, 1, (-1, 3)), (1, 1, (0, -1))])
def test_upfirdn2d_matches_direct(up, down, pad):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  k1 = np.array([1, 3, 3, 1], np.float32)
  want = upfirdn2d_direct(x, np.outer(k1, k1) / 64 * up * up, up, down, pad)
  sep = layers.upfirdn2d(x, layers.separable_taps(k1, up * up), up, down, pad)
  np.testing.assert_allclose(sep, want, atol=1e-5)
  # A non-symmetric 2-D kernel catches a missing flip.
  k2 = rng.standard_normal((3, 2)).astype(np.float32)
  np.testing.assert_allclose(layers.upfirdn2d(x, k2, up, down, pad),
                             upfirdn2d_direct(x, k2, up, down, pad), atol=1e-5)


def test_upfirdn2d_matches_rosinality_native_in_torch():
  """rosinality's upfirdn2d_native semantics, written with torch ops (NCHW)."""
  import torch
  import torch.nn.functional as F
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
  k = torch.tensor(layers.make_kernel([1, 3, 3, 1]) * 4)
  t = torch.from_numpy(x)
  # up=2: reshape-insert zeros, pad (2, 1), conv with the flipped kernel.
  n, c, h, w = t.shape
  u = t.reshape(n, c, h, 1, w, 1)
  u = F.pad(u, [0, 1, 0, 0, 0, 1]).reshape(n, c, h * 2, w * 2)
  u = F.pad(u, [2, 1, 2, 1])
  want = F.conv2d(u.reshape(n * c, 1, *u.shape[2:]), torch.flip(k, [0, 1])[None, None])
  want = want.reshape(n, c, *want.shape[2:]).numpy().transpose(0, 2, 3, 1)
  got = layers.upfirdn2d(x.transpose(0, 2, 3, 1), layers.separable_taps([1, 3, 3, 1], 4.0),
                         up=2, pad=(2, 1))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_fused_leaky_relu():
  x = np.array([-2.0, -0.5, 0.0, 1.5], np.float32)
  b = np.float32(0.5)
  want = np.where(x + b > 0, x + b, 0.2 * (x + b)) * np.sqrt(2)
  np.testing.assert_allclose(layers.fused_leaky_relu(x, b), want, rtol=1e-6)


@pytest.mark.parametrize("src,dst", [((64, 64), (256, 256)), ((1024, 1024), (256, 256)),
                                     ((1024, 1024), (16, 16)), ((50, 70), (20, 33)),
                                     ((7, 5), (16, 9)), ((33, 33), (33, 12)), ((100, 100), (37, 37))])
def test_resize_bilinear_matches_torch(src, dst):
  """torch F.interpolate(mode='bilinear', align_corners=False), no antialias, any sizes."""
  import torch
  import torch.nn.functional as F
  x = np.random.default_rng(sum(src) + sum(dst)).standard_normal((2, 3) + src).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x), size=list(dst), mode="bilinear").numpy()
  got = np.asarray(layers.resize_bilinear(x.transpose(0, 2, 3, 1), dst)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
