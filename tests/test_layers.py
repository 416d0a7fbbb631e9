"""upfirdn2d and the StyleGAN2 FIR helpers against direct implementations."""
import numpy as np
import pytest

from grain_jax.nets import layers


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


def test_lrelu_gradient_from_its_output_is_leaky_relus():
  """lrelu's backward pass reads its output instead of a mask of the input: the same values,
  gradients and second derivatives as jax.nn.leaky_relu, bit for bit (zeros and bfloat16
  included)."""
  import jax
  import jax.numpy as jnp
  x = np.array([-3.0, -0.5, -0.0, 0.0, 1e-30, -1e-30, 2.5], np.float32)
  ref = lambda v: jax.nn.leaky_relu(v, 0.2)
  for dtype in (jnp.float32, jnp.bfloat16):
    v, g = jnp.asarray(x, dtype), jnp.asarray(np.linspace(-2, 3, x.size), dtype)
    np.testing.assert_array_equal(layers.lrelu(v), ref(v))
    vjp = lambda f: jax.vjp(f, v)[1](g)[0]
    np.testing.assert_array_equal(vjp(layers.lrelu), vjp(ref))
  second = lambda f: jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(f(u) ** 2))(v)))
  np.testing.assert_array_equal(second(layers.lrelu)(x), second(ref)(x))


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


# ------------------------------------------------------------------------------ conv weight grads

_DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
  """max |a - b| relative to max |b| (float32 rounding of a sum: ~1e-7 .. 1e-6)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


# (x shape, kernel shape, strides, padding): GRAIN's 3x3 convs (stride 1 and 2), a 1x1, the
# discriminator's EqualConv2d downsampling conv (stride 2, no padding), an asymmetric padding,
# more output than input channels (im2col of x) and fewer (im2col of dy).
CONV_CASES = [((2, 9, 7, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1))),
              ((2, 9, 7, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1))),
              ((3, 8, 10, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
              ((2, 9, 7, 4), (1, 1, 4, 6), (1, 1), ((0, 0), (0, 0))),
              ((4, 11, 11, 6), (3, 3, 6, 5), (2, 2), ((0, 0), (0, 0))),
              ((3, 6, 6, 8), (3, 3, 8, 2), (1, 1), ((2, 0), (1, 2)))]


@pytest.mark.parametrize("xs,ws,strides,pads", CONV_CASES)
def test_matmul_weight_grad_equals_xla(xs, ws, strides, pads):
  """conv2d(weight_grad='matmul'): the plain convolution forward (bit for bit), its input
  gradient, and the weight gradient of jax.grad of the plain conv to float32 rounding (also
  in one-row chunks, the chunk loop and a remainder chunk)."""
  import jax

  rng = np.random.default_rng(sum(xs) + sum(ws))
  x = rng.standard_normal(xs).astype(np.float32)
  w = rng.standard_normal(ws).astype(np.float32)
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)
  mm = lambda x, w: layers.conv2d(x, w, strides, pads, "matmul")
  y = jax.jit(plain)(x, w)
  assert np.array_equal(jax.jit(mm)(x, w), y)
  dy = rng.standard_normal(y.shape).astype(np.float32)
  vjp = lambda f: jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))
  (dx0, dw0), (dx1, dw1) = vjp(plain)(x, w, dy), vjp(mm)(x, w, dy)
  assert _rel(dx1, dx0) < 1e-6  # XLA's own input gradient
  assert _rel(dw1, dw0) < 1e-5
  for chunk_bytes in (1, 3 * dy.shape[0] * ws[0] * ws[1] * 4 * max(xs[2], y.shape[2]) * 8):
    dw = layers.conv_weight_grad_matmul(x, dy, ws, strides, pads, chunk_bytes)
    assert _rel(dw, dw0) < 1e-5, chunk_bytes


def test_matmul_weight_grad_bfloat16_and_layers():
  """bfloat16 (products exact, float32 sums, one rounding: within bfloat16's precision of
  XLA's), and the layers that take weight_grad: conv3x3 (nn.Conv) and EqualConv2d keep
  their params and forward pass."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 6, 4)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
  wgrad = lambda mode: jax.vjp(lambda w: layers.conv2d(x, w, (1, 1), "SAME", mode), w)[1](dy)[0]
  g0, g1 = wgrad("xla"), wgrad("matmul")
  assert g1.dtype == jnp.bfloat16
  want = np.asarray(layers.conv_weight_grad_matmul(x.astype(jnp.float32), dy.astype(jnp.float32),
                                                   w.shape, (1, 1), ((1, 1), (1, 1))))
  assert _rel(g1, want) < 2 ** -8 and _rel(g0, want) < 2 ** -7

  xf = x.astype(jnp.float32)
  for make in (lambda wg: layers.conv3x3(4, stride=2, weight_grad=wg),
               lambda wg: layers.EqualConv2d(4, 3, stride=2, padding=1, weight_grad=wg)):
    m0, m1 = make("xla"), make("matmul")
    v = m0.init(jax.random.key(0), xf)
    assert jax.tree_util.tree_map(jnp.shape, m1.init(jax.random.key(0), xf)) == \
        jax.tree_util.tree_map(jnp.shape, v)
    assert np.array_equal(m1.apply(v, xf), m0.apply(v, xf))
    g = [jax.grad(lambda v, m=m: jnp.sum(m.apply(v, xf) ** 2))(v) for m in (m0, m1)]
    for a, b in zip(jax.tree_util.tree_leaves(g[1]), jax.tree_util.tree_leaves(g[0])):
      assert _rel(a, b) < 1e-5


def test_conv_weight_grad_auto():
  """'auto': the matmul form on CPU for large activations only, XLA's elsewhere."""
  import jax

  assert jax.default_backend() == "cpu"
  big = (1, 256, 256, 64)
  assert layers.conv_weight_grad_impl("auto", big, (3, 3, 64, 32)) == "matmul"
  assert layers.conv_weight_grad_impl("auto", (4, 16, 16, 32), (3, 3, 32, 32)) == "xla"
  assert layers.conv_weight_grad_impl("xla", big, (3, 3, 64, 32)) == "xla"
  with pytest.raises(ValueError, match="conv_weight_grad"):
    layers.conv_weight_grad_impl("fast")


def test_matmul_weight_grads_of_a_network():
  """The stage-1 loss gradient of a small rescaler (every conv in the matmul form, remat on:
  the custom VJP inside jax.checkpoint) equals XLA's to float32 rounding; same forward."""
  import jax

  from grain_jax.train import losses
  from grain_jax.nets.invrrdb import InvRRDB
  from grain_jax.nets.model import placeholder_values
  from tiny_config import tiny_model

  cfg = tiny_model()
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = None

  def grads(mode):
    nonlocal params
    c = cfg.copy_and_resolve_references()
    c.conv_weight_grad, c.remat = mode, mode == "matmul"
    m = InvRRDB.from_config(c)
    if params is None:
      params = placeholder_values(jax.eval_shape(m.init, jax.random.key(0), x))["params"]
      params = jax.tree_util.tree_map(lambda p: p * 10, params)  # torch-init-like scale

    def loss(params):
      lr_float, _, hr, _ = m.apply({"params": params}, x)
      return losses.l2(hr, x) + 0.1 * losses.lr_l2(lr_float, x), hr
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  (g0, hr0), (g1, hr1) = grads("xla"), grads("matmul")
  assert np.array_equal(hr0, hr1)
  a, b = (np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(g)]) for g in (g1, g0))
  assert np.abs(a - b).max() / np.abs(b).max() < 1e-5
