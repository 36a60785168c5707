"""VQ-VAE with hand-written forward and backward passes, in NumPy (or CuPy on a GPU).

van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017,
https://arxiv.org/abs/1711.00937

    x --encoder--> z_e(x) --nearest codebook row--> z_q(x) --decoder--> x_hat

    loss = |x - x_hat|^2 + |sg[z_e(x)] - e|^2 + beta |z_e(x) - sg[e]|^2          (paper eq. 3)

sg[.] is the stop-gradient. The decoder's gradient reaches the encoder through the quantizer
unchanged (the straight-through estimator), the codebook term moves only the codebook, and the
commitment term (beta = 0.25) moves only the encoder. With the EMA variant (paper appendix A.1)
the codebook follows moving averages of the encoder outputs instead of its loss term.
VQGAN's adversarial patch loss (Esser et al. 2021) is a section of its own near the end.

Conventions used everywhere below:
- activations are channels-last, (N, H, W, C): an im2col patch is then one reshape and a
  matmul's output is already the next layer's input, with no transposes in between;
- weights are stored as PyTorch stores them, Conv2d (out, in, kh, kw) and ConvTranspose2d
  (in, out, kh, kw), so they can be exchanged with a PyTorch model;
- every layer has forward(x) -> y, backward(dy) -> dx, and dicts `params` / `grads` with the
  same keys; backward uses only what the latest forward cached.
"""
import contextlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

try:  # CuPy is optional: without it everything runs on NumPy
    import cupy
except Exception:  # not installed, or installed without a working CUDA
    cupy = None

# -----------------------------------------------------------------------------
# array backend: one `xp` handle, NumPy or CuPy, no `if gpu:` in the math


def _gpu_problem():
    """None when CuPy can run on a GPU here, else a sentence saying why not."""
    if cupy is None:
        return "CuPy is not installed (pip install cupy-cuda12x, matching your CUDA version)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy found no GPU"
        cupy.zeros(1).sum()  # a real kernel launch: catches a missing driver or toolkit
    except Exception as e:
        return f"CuPy cannot use the GPU ({type(e).__name__}: {e})"
    return None


class DeviceError(RuntimeError):
    """The GPU was asked for but cannot be used; the message says why."""


class NonFiniteError(ValueError):
    """A training step met NaN or infinite values and changed nothing; the message says where."""


def backend(device=None):
    """The array module for `device`: 'cpu' (NumPy), 'gpu' (CuPy) or 'auto' (CuPy when a GPU
    is usable). The default comes from $VQVAE_DEVICE, else 'auto'."""
    device = (device or os.environ.get("VQVAE_DEVICE") or "auto").strip().lower()
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")
    if device == "cpu":
        return np
    problem = _gpu_problem()
    if problem is None:
        return cupy
    if device == "gpu":
        raise DeviceError(f"device 'gpu' was asked for, but {problem}")
    return np


def array_module(a):
    """np or cupy, whichever owns `a`."""
    return cupy.get_array_module(a) if cupy is not None else np


def to_numpy(a):
    """A host (NumPy) copy of a NumPy or CuPy array."""
    return cupy.asnumpy(a) if cupy is not None and isinstance(a, cupy.ndarray) else np.asarray(a)


def uniform_init(rng, xp=np, dtype="float32"):
    """Parameter factory: U(-bound, bound) drawn by a NumPy generator, cast, then moved to the
    device, so that CPU and GPU runs start from identical weights."""
    def init(shape, bound):
        return xp.asarray(rng.uniform(-bound, bound, size=shape).astype(dtype))
    return init


# -----------------------------------------------------------------------------
# layers


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _padding(p):
    """int, (ph, pw) or ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    if isinstance(p, int):
        return ((p, p), (p, p))
    ph, pw = p
    return (_pair(ph), _pair(pw))


def pad_hw(x, padding):
    """Zero-pad the H and W axes of an (N, H, W, C) array (faster than np.pad)."""
    (t, b), (l, r) = padding
    if t == b == l == r == 0:
        return x
    N, H, W, C = x.shape
    out = array_module(x).zeros((N, t + H + b, l + W + r, C), dtype=x.dtype)
    out[:, t:t + H, l:l + W] = x
    return out


def crop_hw(x, padding):
    """Inverse of pad_hw: drop the padded border again."""
    (t, b), (l, r) = padding
    N, H, W, C = x.shape
    return x[:, t:H - b, l:W - r, :]


def windows(x, kh, kw, stride):
    """All kh x kw patches of an (N, H, W, C) array, as a strided view (N, Ho, Wo, kh, kw, C).
    No copy: patch (n, i, j) starts at pixel (i * stride, j * stride)."""
    N, H, W, C = x.shape
    Ho, Wo = (H - kh) // stride + 1, (W - kw) // stride + 1
    sN, sH, sW, sC = x.strides
    return array_module(x).lib.stride_tricks.as_strided(
        x, shape=(N, Ho, Wo, kh, kw, C), strides=(sN, sH * stride, sW * stride, sH, sW, sC))


def col2im(cols, H, W, stride, crop=((0, 0), (0, 0))):
    """Adjoint of windows(): add every patch back onto the pixels it was cut from, then drop the
    crop's border: cols (N, Ho, Wo, kh, kw, C) -> (N, H - t - b, W - l - r, C).
    One strided-slice add per kernel offset (no np.add.at, whose repeated-index scatter is an
    order of magnitude slower), each over only the patches whose pixel lands inside the crop."""
    N, Ho, Wo, kh, kw, C = cols.shape
    (t, b), (l, r) = crop
    x = array_module(cols).zeros((N, H - t - b, W - l - r, C), dtype=cols.dtype)
    for i in range(kh):
        a0, a1 = inside(i, stride, Ho, t, H - b)                      # patch rows whose offset i lands inside
        for j in range(kw):
            c0, c1 = inside(j, stride, Wo, l, W - r)                  # patch columns, likewise
            if a0 < a1 and c0 < c1:                                    # patch (a, c) offset (i, j) -> pixel (i + s a, j + s c)
                x[:, i + stride * a0 - t:i + stride * (a1 - 1) - t + 1:stride,
                  j + stride * c0 - l:j + stride * (c1 - 1) - l + 1:stride, :] += cols[:, a0:a1, c0:c1, i, j, :]
    return x


def inside(offset, stride, n, lo, hi):
    """The patches a in [a0, a1) of n whose pixel offset + stride * a lies in [lo, hi)."""
    return max(0, -((offset - lo) // stride)), min(n, (hi - 1 - offset) // stride + 1)


def column_sums(a):
    """a.sum(0) of a tall (M, C) matrix, as the matvec ones(M) @ a: NumPy's column sums of a
    narrow matrix run ~10-25x slower than BLAS's (a bias gradient of 3 channels: 0.47 -> 0.02 ms)."""
    return array_module(a).ones(a.shape[0], dtype=a.dtype) @ a


def conv_matrix(W):
    """A Conv2d weight (O, C, kh, kw) as the matrix that im2col patches, (kh, kw, C) flattened,
    multiply: (kh*kw*C, O), a column per output channel. A view for 1x1 kernels, rotated or not."""
    return W.transpose(2, 3, 1, 0).reshape(-1, W.shape[0])


def conv_weight(W_mat, kh, kw):
    """Inverse of conv_matrix: (kh*kw*C, O) -> a Conv2d weight (O, C, kh, kw), as a view."""
    O = W_mat.shape[1]
    return W_mat.reshape(kh, kw, -1, O).transpose(3, 2, 0, 1)


def rot180(W):
    """(O, C, kh, kw) -> (C, O, kh, kw): the kernel rotated by 180 degrees, in and out swapped,
    of the adjoint of a stride-1 convolution (a view; rot180(rot180(W)) is W)."""
    return W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)


def conv(x_pad, W, stride):
    """y[n, i, j, o] = sum_{c, u, v} W[o, c, u, v] x_pad[n, i*s + u, j*s + v, c], no bias.
    One matmul of the im2col patches with the weights -> (y (N, Ho, Wo, O), patches (M, kh*kw*C))."""
    O, C, kh, kw = W.shape
    patches = windows(x_pad, kh, kw, stride)                           # (N, Ho, Wo, kh, kw, C) view
    N, Ho, Wo = patches.shape[:3]
    cols = patches.reshape(N * Ho * Wo, -1)                            # (M, kh*kw*C) copy (a view for 1x1)
    W_mat = conv_matrix(W)                                             # (kh*kw*C, O), rows match a patch
    return (cols @ W_mat).reshape(N, Ho, Wo, O), cols


def conv_adjoint_by_col2im(dy, W, stride, x_pad_shape, crop=((0, 0), (0, 0))):
    """The adjoint of conv(., W, stride) by its definition: each output pixel's gradient spread
    over the patch it was computed from, dy (N, Ho, Wo, O) -> dx_pad (N, Hp, Wp, C), less the crop."""
    O, C, kh, kw = W.shape
    N, Ho, Wo, _ = dy.shape
    W_mat = conv_matrix(W)                                             # (kh*kw*C, O)
    dcols = (dy.reshape(-1, O) @ W_mat.T).reshape(N, Ho, Wo, kh, kw, C)  # cols @ W_mat = y
    return col2im(dcols, x_pad_shape[1], x_pad_shape[2], stride, crop)  # cols = windows(x_pad)


def col2im_is_cheaper(c_in, c_out):
    """Which of two ways to compute a convolution-like product costs less. im2col copies kh*kw*c_in
    numbers per output pixel before one matmul; the col2im form multiplies each input pixel by all
    kh*kw taps at once and adds kh*kw*c_out numbers per pixel back in strided slices. Measured
    here, a strided add costs about four copied numbers: col2im pays where 4 c_out <= c_in
    (a residual block's 3x3 from 128 to 32 channels: 1.26 -> 0.84 ms, batch 32 of 7x7)."""
    return 4 * c_out <= c_in


def conv_adjoint(dy, W, stride, x_pad_shape, crop=((0, 0), (0, 0))):
    """crop_hw(conv_adjoint_by_col2im(dy, W, stride, x_pad_shape), crop), computed as a
    convolution where the stride divides the kernel and the padded input: col2im's kh*kw
    strided adds run on one core in NumPy, a matmul on all.

    Fold each s x s block of pixels into channels (space-to-depth): the convolution becomes a
    stride-1 one with kernel (kh/s, kw/s). The adjoint of a stride-1 convolution is a convolution
    of the zero-padded dy with the kernel rotated by 180 degrees and in/out channels swapped.
    Unfold the blocks again (depth-to-space). For s = 1 the folding does nothing.
    The crop (the forward's padding) is taken from dy's padding where whole blocks allow it, so
    the border that would be cropped is never computed (for a 3x3 conv on 8x8, 36 % of the work)."""
    O, C, kh, kw = W.shape
    N, Hp, Wp, _ = x_pad_shape
    s = stride
    if kh % s or kw % s or Hp % s or Wp % s:
        return conv_adjoint_by_col2im(dy, W, stride, x_pad_shape, crop)
    bh, bw = kh // s, kw // s
    W_blocks = W.reshape(O, C, bh, s, bw, s).transpose(0, 3, 5, 1, 2, 4).reshape(O, s * s * C, bh, bw)
    (t, b), (l, r) = crop
    if col2im_is_cheaper(O, s * s * C):
        # few output channels (a last layer's 3): col2im's adds write kh*kw/s^2 copies of the small
        # output, where im2col would copy dy, with its many channels, kh*kw/s^2 times
        bt, bb, bl, br = t // s, b // s, l // s, r // s                # whole blocks of the crop
        dx_blocks = conv_adjoint_by_col2im(dy, W_blocks, 1, (N, Hp // s, Wp // s, s * s * C), ((bt, bb), (bl, br)))
    else:
        bt, bb, bl, br = min(t // s, bh - 1), min(b // s, bh - 1), min(l // s, bw - 1), min(r // s, bw - 1)
        W_rot = rot180(W_blocks)                                       # (s*s*C, O, bh, bw)
        dy_pad = pad_hw(dy, ((bh - 1 - bt, bh - 1 - bb), (bw - 1 - bl, bw - 1 - br)))  # less padding: pre-cropped
        dx_blocks, _ = conv(dy_pad, W_rot, 1)                          # (N, Hb, Wb, s*s*C)
    Hb, Wb = dx_blocks.shape[1:3]
    dx_pad = dx_blocks.reshape(N, Hb, Wb, s, s, C).transpose(0, 1, 3, 2, 4, 5)  # (N, Hb, s, Wb, s, C)
    dx = dx_pad.reshape(N, Hb * s, Wb * s, C)                          # blocks bt.. of the padded input
    return crop_hw(dx, ((t - s * bt, b - s * bb), (l - s * bl, r - s * br)))  # what whole blocks left


def conv_by_col2im(x, W, padding):
    """conv(pad_hw(x, padding), W, 1) in the col2im form, for few output channels (see
    col2im_is_cheaper). A stride-1 convolution is the adjoint of the convolution with the kernel
    rotated by 180 degrees (in/out swapped) on the 'full' output, the one every tap of every pixel
    reaches; the padding is what of that output is kept: a crop of kernel - 1 - padding."""
    O, C, kh, kw = W.shape
    N, H, Wd, _ = x.shape
    (t, b), (l, r) = padding
    full = (N, H + kh - 1, Wd + kw - 1, O)
    return conv_adjoint_by_col2im(x, rot180(W), 1, full, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r)))


class Conv2d:
    """y = conv(pad(x), W, stride) + b, weights (out, in, kh, kw) as torch.nn.Conv2d.
    input_grad=False skips dx where nobody needs it (a first layer's image gradient)."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0, init=None, input_grad=True):
        init = init or uniform_init(np.random.default_rng(0))
        self.kh, self.kw = _pair(kernel)
        self.stride, self.padding, self.input_grad = stride, _padding(padding), input_grad
        bound = 1 / math.sqrt(in_ch * self.kh * self.kw)  # PyTorch's default init
        self.params = {"W": init((out_ch, in_ch, self.kh, self.kw), bound),
                       "b": init((out_ch,), bound)}
        self.grads = {}

    def apply(self, x_pad):
        """The layer on an input that already holds its padding, caching nothing (the prior's
        incremental sampler calls it on slices) -> (y, patches)."""
        y, cols = conv(x_pad, self.params["W"], self.stride)
        y += self.params["b"]                                          # in place: one pass fewer
        return y, cols

    def forward(self, x):
        W = self.params["W"]
        O, C = W.shape[:2]
        # few outputs: no patches to cut. On the CPU only: on a GPU, where a step is bound by kernel
        # launches, the kh*kw slice adds cost more than one copy (measured on an H100: 9 % slower, config a)
        if array_module(x) is np and self.grads_from_adjoint() and self.kh * self.kw > 1 and col2im_is_cheaper(C, O):
            y = conv_by_col2im(x, W, self.padding)
            y += self.params["b"]
            self.cache = x
            return y
        x_pad = pad_hw(x, self.padding)
        y, _ = self.apply(x_pad)
        # the patches are not kept: MBs held from forward to backward push everything else out of
        # the caches, and backward cutting them again is faster (measured: 5-10 % of a step, single thread)
        self.cache = x if self.grads_from_adjoint() else x_pad
        return y                                                       # (N, Ho, Wo, O)

    def grads_from_adjoint(self):
        """Whether backward takes dW from the adjoint's patches of dy (see there), not the forward's."""
        (t, b), (l, r) = self.padding
        return self.input_grad and self.stride == 1 and max(t, b) < self.kh and max(l, r) < self.kw

    def backward(self, dy):
        W = self.params["W"]
        O, C, kh, kw = W.shape
        dy_mat = dy.reshape(-1, O)                                     # (M, O)
        self.grads["b"] = column_sums(dy_mat)                          # y = ... + b
        (t, b), (l, r) = self.padding
        if self.grads_from_adjoint():
            # stride 1: dx is the convolution of the padded dy with the rotated kernel (see
            # conv_adjoint), and the patches of dy it cuts, one row per input pixel, also give dW:
            # dW[o, c, u, v] = sum_p x[p, c] dy[p + (t - u, l - v), o]. One im2col serves both
            # gradients, and the forward's patches, cold in memory by now, are not read again.
            x = self.cache
            dx, dcols = conv(pad_hw(dy, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r))), rot180(W), 1)
            dW_rot_mat = dcols.T @ x.reshape(-1, C)                    # (kh*kw*O, C), as conv_matrix(rot180(W))
            self.grads["W"] = rot180(conv_weight(dW_rot_mat, kh, kw))  # (O, C, kh, kw)
            return dx                                                  # (N, H, W, C)
        x_pad = self.cache
        cols = windows(x_pad, kh, kw, self.stride).reshape(dy_mat.shape[0], -1)  # (M, kh*kw*C), as in conv()
        # y = cols @ W_mat -> dW_mat = cols^T dy; as cols.T @ dy, not (dy.T @ cols).T: OpenBLAS
        # runs this orientation 10-20 % faster at these shapes (long M, short O)
        dW_mat = cols.T @ dy_mat                                       # (kh*kw*C, O), as W_mat
        self.grads["W"] = conv_weight(dW_mat, kh, kw)                  # (O, C, kh, kw)
        if not self.input_grad:
            return None
        return conv_adjoint(dy, W, self.stride, x_pad.shape, self.padding)  # y = conv(pad(x))


class ConvTranspose2d:
    """The adjoint of Conv2d plus a bias: every input pixel scatters W[c] * x[n, i, j, c] onto a
    kh x kw patch of the output at (i*s, j*s), then the padding is cropped.
    Weights (in, out, kh, kw) as torch.nn.ConvTranspose2d: read as a Conv2d weight from `out`
    channels to `in` channels, this layer is that convolution's adjoint.
    Output size (H - 1) * s - 2p + k, as in torch.nn.ConvTranspose2d."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0, init=None):
        init = init or uniform_init(np.random.default_rng(0))
        self.kh, self.kw = _pair(kernel)
        self.stride, self.padding = stride, _padding(padding)
        bound = 1 / math.sqrt(out_ch * self.kh * self.kw)  # PyTorch's default init
        self.params = {"W": init((in_ch, out_ch, self.kh, self.kw), bound),
                       "b": init((out_ch,), bound)}
        self.grads = {}

    def forward(self, x):
        W = self.params["W"]
        N, H, W_in, Ci = x.shape
        Hp, Wp = (H - 1) * self.stride + self.kh, (W_in - 1) * self.stride + self.kw
        y = conv_adjoint(x, W, self.stride, (N, Hp, Wp, W.shape[1]), self.padding)  # (N, Hout, Wout, Co)
        self.cache = x
        y += self.params["b"]                                          # in place: y is conv_adjoint's fresh output
        return y

    def backward(self, dy):
        x = self.cache
        Ci, Co = self.params["W"].shape[:2]
        self.grads["b"] = column_sums(dy.reshape(-1, Co))              # y = ... + b
        dx, dcols = conv(pad_hw(dy, self.padding), self.params["W"], self.stride)  # the adjoint's adjoint
        dW_mat = dcols.T @ x.reshape(-1, Ci)                           # (kh*kw*Co, Ci): dx = dcols @ W_mat
        self.grads["W"] = conv_weight(dW_mat, self.kh, self.kw)        # (Ci, Co, kh, kw)
        return dx                                                      # (N, H, W, Ci)

    def weight_grad(self, dy):
        """backward(dy)'s grads['W'] alone, from the cached input, leaving .grads as they are: dW is
        linear in dy, so the gradient of any loss at this layer's weights costs one matmul once the
        loss's gradient at the output is known (VQGAN's adaptive weight asks for two)."""
        x = self.cache
        N, H, W, Ci = x.shape
        dy_pad = pad_hw(dy, self.padding)                              # (N, Hp, Wp, Co)
        dcols = windows(dy_pad, self.kh, self.kw, self.stride).reshape(N * H * W, -1)  # (M, kh*kw*Co), as in backward
        return conv_weight(dcols.T @ x.reshape(-1, Ci), self.kh, self.kw)  # (Ci, Co, kh, kw)


class ReLU:
    def __init__(self):
        self.params, self.grads = {}, {}

    def forward(self, x):
        self.cache = x
        return array_module(x).maximum(x, 0)

    def backward(self, dy):
        return dy * (self.cache > 0)                                   # 1 where x > 0, else 0


class LeakyReLU:
    """y = x where x > 0, else slope x (Maas et al. 2013): the discriminator's activation, slope 0.2
    as in PatchGAN. A dead unit still passes slope times its gradient."""

    def __init__(self, slope=0.2):
        self.slope = float(slope)                                      # a Python float keeps float32 float32
        self.params, self.grads = {}, {}

    def forward(self, x):
        self.cache = x
        return array_module(x).where(x > 0, x, self.slope * x)

    def backward(self, dy):
        return array_module(dy).where(self.cache > 0, dy, self.slope * dy)  # 1 where x > 0, else slope


class MeanPool:
    """(N, H, W, C) -> (N, 1, 1, C): the mean over positions (global average pooling), so
    that a 1x1 Conv2d after it is a linear layer on one feature vector per image."""

    def __init__(self):
        self.params, self.grads = {}, {}

    def forward(self, x):
        self.shape = x.shape
        return x.mean((1, 2), keepdims=True)

    def backward(self, dy):
        N, H, W, C = self.shape
        return array_module(dy).broadcast_to(dy / (H * W), self.shape).copy()  # each position had weight 1/(H W)


def softmax_cross_entropy(logits, labels):
    """Mean -log softmax(logits)[label] over the rows of logits (M, K) -> (loss, d loss / d logits)."""
    xp = array_module(logits)
    z = logits - logits.max(1, keepdims=True)                          # same softmax, no overflow
    logp = z - xp.log(xp.exp(z).sum(1, keepdims=True))                 # (M, K) log softmax
    M = len(labels)
    onehot = one_hot(labels, logits.shape[1], logits.dtype)            # (M, K)
    loss = -(onehot * logp).sum() / M
    return loss, (xp.exp(logp) - onehot) / M                           # softmax - onehot, per row


def gather(parts, attr):
    """One flat dict of the `params`, `grads` or `buffers` of named parts: '<part>.<name>'."""
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in getattr(part, attr, {}).items()}


class Sequential:
    """Layers applied in order; parameters named '<index>.<name>' like torch.nn.Sequential."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    @property
    def params(self):
        return gather(dict(enumerate(self.layers)), "params")

    @property
    def grads(self):
        return gather(dict(enumerate(self.layers)), "grads")


class ResidualBlock(Sequential):
    """x + conv1x1(relu(conv3x3(relu(x)))), the block of the paper's encoder and decoder."""

    def __init__(self, ch, hidden_ch, init=None):
        super().__init__(ReLU(), Conv2d(ch, hidden_ch, 3, padding=1, init=init),
                         ReLU(), Conv2d(hidden_ch, ch, 1, init=init))

    def forward(self, x):
        return x + super().forward(x)

    def backward(self, dy):
        return dy + super().backward(dy)                               # the skip adds dy unchanged


# -----------------------------------------------------------------------------
# quantizers
#
# Every quantizer has the same interface, so the model can hold any of them:
#   K, in_dim, out_dim     codes (per stage), channels it takes from pre_quant, channels of z_q
#   params, grads, buffers dicts as for layers; buffers are saved state that Adam does not train
#   forward(z_e (N, h, w, in_dim), train) -> z_q (N, h, w, out_dim), stats: 'codes', 'perplexity',
#                          'usage', 'vq' (its term of the loss) and the parts that 'vq' sums
#   backward(dz_q) -> dz_e
#   quantize(z_e) -> codes, deterministic; lookup(codes) -> z_q; check_codes(codes, xp)


def code_stats(codes, K):
    """Perplexity exp(H(p)) of the code frequencies p, and the fraction of the K codes used."""
    xp = array_module(codes)
    p = xp.bincount(codes.ravel(), minlength=K) / codes.size           # (K,) code frequencies
    return {"perplexity": xp.exp(-(p * xp.log(p + 1e-10)).sum()), "usage": (p > 0).mean()}


def check_codes(codes, K, xp, shape_name="(N, h, w)"):
    """Integer codes of rank len(shape_name) in [0, K), moved to xp; a ValueError naming the
    problem otherwise. The range is checked where the codes live: host codes cost no device sync."""
    shape = getattr(codes, "shape", None)
    if shape is None or len(shape) != shape_name.count(",") + 1 or 0 in shape:
        raise ValueError(f"expected integer codes of shape {shape_name}, got shape {shape}"
                         + (" (empty)" if shape and 0 in shape else ""))
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"codes must lie in [0, {K}), got values in [{lo}, {hi}]")
    return xp.asarray(codes)


def nearest(z, E):
    """Index of the nearest row of E (K, D) for each row of z (M, D) -> (M,).
    |z - e_k|^2 = |z|^2 - 2 z.e_k + |e_k|^2 expanded: memory O(M K), never an (M, K, D)
    array. |z|^2 is the same for every k, so the argmin leaves it out."""
    dist = z @ (-2 * E.T)                                              # (M, K): -2 z.e_k
    dist += (E * E).sum(1)                                             # + |e_k|^2, in place
    return dist.argmin(1)


def logsumexp(a, axis):
    """log sum exp(a) along `axis`, kept as a size-1 axis; the max is subtracted first so that
    exp never overflows."""
    xp = array_module(a)
    m = a.max(axis, keepdims=True)
    return m + xp.log(xp.exp(a - m).sum(axis, keepdims=True))


def backend_of(init):
    """xp and dtype of the arrays `init` makes, from an empty one (no random numbers drawn)."""
    like = init((0,), 0.0)
    return array_module(like), like.dtype


def one_hot(codes, K, dtype):
    """(M,) integer codes -> (M, K) rows with a single 1."""
    xp = array_module(codes)
    onehot = xp.zeros((len(codes), K), dtype=dtype)
    onehot[xp.arange(len(codes)), codes] = 1                           # one write per row: no repeats
    return onehot


def step_rng(seed, step):
    """The generator of one training step's random choices: a function of (seed, step) alone,
    so that a run resumed at any step draws what the uninterrupted run drew."""
    return np.random.default_rng([*np.ravel(seed), step])


def kmeans(z, K, rng, iters=10):
    """Lloyd's k-means on the rows of z (M, D) -> centroids (K, D), started from K distinct rows
    (with repeats only when M < K). A centroid that loses all its rows stays where it was."""
    xp = array_module(z)
    C = z[xp.asarray(rng.choice(len(z), K, replace=len(z) < K))]       # (K, D)
    for _ in range(iters):
        onehot = one_hot(nearest(z, C), K, z.dtype)                    # (M, K): assignment step
        n = onehot.sum(0)[:, None]                                     # (K, 1) rows per centroid
        C = xp.where(n > 0, (onehot.T @ z) / xp.maximum(n, 1), C)      # update step: the means
    return C


class VectorQuantizer:
    """Nearest-neighbour lookup in a K x D codebook, learned through its loss term (eq. 1-3).

    forward(z_e (N, h, w, D)) -> z_q (N, h, w, D), stats with the codes and the loss parts.

    Codebook health (both off by default; the paper has neither):
    - kmeans_init: on the first training batch, the codebook becomes the k-means centroids of
      that batch's encoder outputs, so that every code starts where the data is;
    - restart_threshold > 0: dead-code restarts, Jukebox's "random restarts for embeddings"
      (Dhariwal et al. 2020):
      each code's usage u_k <- decay u_k + (1 - decay) n_k is tracked, and before each training
      batch a code with u_k < threshold is re-seeded with a random encoder output of that
      batch, its usage reset to the threshold.
    The random choices come from a generator seeded by (seed, step), so a resumed run is exact.
    """

    def __init__(self, K, D, beta=0.25, init=None, kmeans_init=False, restart_threshold=0.0, decay=0.99, seed=0):
        init = init or uniform_init(np.random.default_rng(0))
        self.K, self.D, self.beta = K, D, beta
        self.in_dim = self.out_dim = D
        self.codebook = init((K, D), math.sqrt(3 / D))  # sonnet's VarianceScaling(uniform)
        self.params = {"codebook": self.codebook}
        self.buffers = {}                                # state that is not trained by Adam
        self.grads = {}
        self.kmeans_init, self.restart_threshold, self.decay, self.seed = kmeans_init, restart_threshold, decay, seed
        if kmeans_init or restart_threshold > 0:
            self.buffers["step"] = np.zeros((), np.int64)  # host counter of training batches: seeds the random choices
        if restart_threshold > 0:
            self.buffers["usage"] = array_module(self.codebook).full(K, restart_threshold, dtype=self.codebook.dtype)

    def nearest(self, z):
        return nearest(z, self.codebook)

    def quantize(self, z_e):
        """Codes (N, h, w) of encoder outputs (N, h, w, D)."""
        N, h, w, D = z_e.shape
        return self.nearest(z_e.reshape(-1, D)).reshape(N, h, w)

    def lookup(self, codes):
        """z_q = e_k: codebook rows for integer codes of any shape -> codes.shape + (D,)."""
        return self.codebook[codes]

    def check_codes(self, codes, xp):
        return check_codes(codes, self.K, xp)

    # --- codebook health: moves the codebook before a training batch is assigned
    def health(self, z):
        step = int(self.buffers["step"])
        rng = step_rng(self.seed, step)
        if self.kmeans_init and step == 0:
            self.reseed(array_module(z).ones(self.K, dtype=bool), kmeans(z, self.K, rng))
        elif self.restart_threshold > 0:
            dead = self.usage < self.restart_threshold                 # (K,) codes not used lately
            self.reseed(dead, z[array_module(z).asarray(rng.integers(0, len(z), self.K))])  # a random z_e for each
        self.buffers["step"] += 1

    @property
    def usage(self):
        return self.buffers["usage"]

    def reseed(self, which, rows):
        """Codes where `which` (K,) is true become `rows` (K, D); their usage starts at the threshold.
        (Adam's moments of a re-seeded row are left as they were: small next to a jump to the data.)"""
        self.codebook[...] = array_module(rows).where(which[:, None], rows, self.codebook)
        if self.restart_threshold > 0:
            self.usage[which] = self.restart_threshold

    def track_usage(self, n_k):
        if self.restart_threshold > 0:
            self.usage[...] *= self.decay; self.usage[...] += (1 - self.decay) * n_k  # u_k <- decay u_k + (1 - decay) n_k

    # --- training
    def _assign(self, z_e, train):
        """Shared by both quantizers: codes, z_q and the usage statistics."""
        N, h, w, D = z_e.shape
        z = z_e.reshape(-1, D)                                         # (M, D)
        if train and "step" in self.buffers:
            self.health(z)
        codes = self.nearest(z)                                        # (M,)
        z_q = self.lookup(codes)                                       # (M, D), eq. 2
        onehot = one_hot(codes, self.K, z.dtype)                       # (M, K)
        return z, z_q, onehot, {"codes": codes.reshape(N, h, w), **code_stats(codes, self.K)}

    def forward(self, z_e, train=True):
        z, z_q, onehot, stats = self._assign(z_e, train)
        sq = ((z - z_q) ** 2).mean()                                   # both terms have this value ...
        stats["codebook"] = sq                                         # |sg[z_e] - e|^2: ... it moves e only
        stats["commitment"] = sq                                       # |z_e - sg[e]|^2: ... it moves z_e only
        stats["vq"] = stats["codebook"] + self.beta * stats["commitment"]
        if train:
            self.track_usage(onehot.sum(0))
        self.cache = (z, z_q, onehot)
        return z_q.reshape(z_e.shape), stats

    def backward(self, dz_q):
        z, z_q, onehot = self.cache
        dz_e = dz_q.reshape(z.shape)                                   # straight-through: decoder's gradient copied to the encoder
        dz_e = dz_e + self.beta * 2 * (z - z_q) / z.size               # commitment: encoder only
        dz_e_codebook = 2 * (z_q - z) / z.size                         # codebook loss: the codebook only
        self.grads["codebook"] = onehot.T @ dz_e_codebook              # row k sums its assigned vectors; unused rows get 0
        return dz_e.reshape(dz_q.shape)


class VectorQuantizerEMA(VectorQuantizer):
    """The codebook as exponential moving averages of the encoder outputs (paper appendix A.1):

        N_k <- gamma N_k + (1 - gamma) n_k           n_k: vectors assigned to code k in the batch
        m_k <- gamma m_k + (1 - gamma) sum z_e       over the vectors assigned to code k
        e_k <- m_k / N_k                             with N_k Laplace-smoothed by eps

    Only the commitment term reaches the encoder. The averages move only in training mode.

    Initial state: N_k = 1 and m_k = e_k, so that e_k = m_k / N_k holds from the first step.
    A code that is never used then decays as gamma^t in both m_k and N_k and stays where it
    was (until gamma^t nears eps). Starting N_k at 0 with m_k = e_k, as several public versions
    do, divides an unused code by ~eps and sends it far away on the first update; sonnet's
    zero-debiased averages instead move an unused code to the origin.

    Codebook health as for VectorQuantizer, with N_k as the usage (as in Jukebox): a re-seeded
    code gets N_k = threshold (1 without restarts) and m_k = N_k e_k, so e_k = m_k / N_k still holds.
    """

    def __init__(self, K, D, beta=0.25, decay=0.99, eps=1e-5, init=None, kmeans_init=False, restart_threshold=0.0,
                 seed=0):
        super().__init__(K, D, beta, init, kmeans_init, restart_threshold, decay, seed)
        self.eps = eps
        self.buffers.pop("usage", None)                                # N_k below counts the uses
        xp = array_module(self.codebook)
        self.params = {}                                               # nothing for Adam
        self.buffers.update(codebook=self.codebook, ema_count=xp.ones(K, dtype=self.codebook.dtype),
                            ema_sum=self.codebook.copy())

    @property
    def usage(self):
        return self.buffers["ema_count"]                               # N_k counts uses, as Jukebox's restarts do

    def reseed(self, which, rows):
        N, m, xp = self.buffers["ema_count"], self.buffers["ema_sum"], array_module(rows)
        N[...] = xp.where(which, self.restart_threshold or 1.0, N)   # a fresh count: the threshold, or 1 as at the start
        self.codebook[...] = xp.where(which[:, None], rows, self.codebook)
        m[...] = xp.where(which[:, None], N[:, None] * rows, m)        # m_k = N_k e_k: consistent with e_k <- m_k / N_k

    def forward(self, z_e, train=True):
        z, z_q, onehot, stats = self._assign(z_e, train)               # with the codebook before the update
        stats["commitment"] = ((z - z_q) ** 2).mean()                  # |z_e - sg[e]|^2
        stats["vq"] = self.beta * stats["commitment"]
        if train:
            self.ema_update(z, onehot)
        self.cache = (z, z_q)
        return z_q.reshape(z_e.shape), stats

    def ema_update(self, z, onehot):
        N, m, g = self.buffers["ema_count"], self.buffers["ema_sum"], self.decay
        n_k = onehot.sum(0)                                            # (K,) assignments per code
        s_k = onehot.T @ z                                             # (K, D) sum of assigned z_e
        N *= g; N += (1 - g) * n_k                                     # N_k <- g N_k + (1 - g) n_k
        m *= g; m += (1 - g) * s_k                                     # m_k <- g m_k + (1 - g) s_k
        n = N.sum()
        N_smooth = (N + self.eps) / (n + self.K * self.eps) * n        # Laplace smoothing, same total n
        self.codebook[...] = m / N_smooth[:, None]                     # e_k <- m_k / N_k

    def backward(self, dz_q):
        z, z_q = self.cache
        dz_e = dz_q.reshape(z.shape)                                   # straight-through: decoder's gradient copied to the encoder
        dz_e = dz_e + self.beta * 2 * (z - z_q) / z.size               # commitment: encoder only
        return dz_e.reshape(dz_q.shape)                                # no codebook gradient: EMA moves it


class ResidualVQ:
    """Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec, Défossez et al.
    2022): S stages with their own K x D codebooks, each quantizing what the previous left over.

        r_0 = z_e,   q_s = e^(s)_{k_s} nearest to r_s,   r_{s+1} = r_s - sg[q_s],   z_q = sum_s q_s

    Codes are (N, S, h, w); K^S combinations from S K codebook rows. Each stage is an EMA
    quantizer (as in SoundStream) with its own commitment term beta |r_s - sg[q_s]|^2.

    The stop-gradient in r_{s+1} is what lets every stage's commitment reach the encoder:
    dr_{s+1}/dr_s = I, so dz_e = dz_q + sum_s beta 2 (r_s - q_s) / n. Subtracting the stage's
    straight-through output instead (r_{s+1} = r_s - (r_s + sg[q_s - r_s])), as some public code
    does, has the same value but dr_{s+1}/dr_s = 0: the later stages' commitment never arrives.
    """

    def __init__(self, S, K, D, beta=0.25, decay=0.99, eps=1e-5, init=None, kmeans_init=False, restart_threshold=0.0,
                 seed=0):
        self.S, self.K, self.in_dim, self.out_dim = S, K, D, D
        self.stages = {f"stage{s}": VectorQuantizerEMA(K, D, beta, decay, eps, init, kmeans_init, restart_threshold,
                                                       (*np.ravel(seed), s)) for s in range(S)}
        self.params, self.grads, self.buffers = {}, {}, gather(self.stages, "buffers")

    def forward(self, z_e, train=True):
        r, z_q, parts = z_e, 0, []
        for q in self.stages.values():
            q_s, stats = q.forward(r, train)                           # the code nearest to the residual r_s
            z_q = z_q + q_s                                            # z_q = sum_s q_s
            r = r - q_s                                                # r_{s+1} = r_s - sg[q_s]
            parts.append(stats)
        stats = {"codes": array_module(z_e).stack([p["codes"] for p in parts], 1)}  # (N, S, h, w)
        for k in ("perplexity", "usage"):
            stats[k] = sum(p[k] for p in parts) / self.S               # the stages' mean
        stats["commitment"] = sum(p["commitment"] for p in parts)      # sum_s |r_s - sg[q_s]|^2
        stats["vq"] = sum(p["vq"] for p in parts)
        return z_q, stats

    def backward(self, dz_q):
        d = dz_q                                                       # straight-through: decoder's gradient copied to the encoder
        for q in reversed(list(self.stages.values())):
            d = q.backward(d)                                          # + stage s's commitment; dr_{s+1}/dr_s = I passes the rest on
        return d

    def quantize(self, z_e):
        r, codes = z_e, []
        for q in self.stages.values():
            codes.append(q.quantize(r))
            r = r - q.lookup(codes[-1])
        return array_module(z_e).stack(codes, 1)                       # (N, S, h, w)

    def lookup(self, codes):
        """Codes (N, S, h, w) -> sum over stages of their codebook rows (N, h, w, D)."""
        return sum(q.lookup(codes[:, s]) for s, q in enumerate(self.stages.values()))

    def check_codes(self, codes, xp):
        codes = check_codes(codes, self.K, xp, "(N, S, h, w)")
        if codes.shape[1] != self.S:
            raise ValueError(f"expected codes of shape (N, {self.S}, h, w) for {self.S} stages, got {codes.shape}")
        return codes

    @staticmethod
    def to_grid(codes):
        """(N, S, h, w) -> (N, h, w S): each position's S codes side by side, so that raster
        order is position by position, stage by stage (the order of RQ-Transformer)."""
        N, S, h, w = codes.shape
        return codes.transpose(0, 2, 3, 1).reshape(N, h, w * S)       # (N, h, w, S) -> (N, h, w S)

    @staticmethod
    def from_grid(grid, S):
        N, h, wS = grid.shape
        return grid.reshape(N, h, wS // S, S).transpose(0, 3, 1, 2)    # (N, S, h, w)


class FSQ:
    """Finite scalar quantization: channel i of z_e is bounded to L_i levels and rounded.

        bound(z) = tanh(z + shift) half_l - offset     half_l = (L - 1)(1 + eps) / 2
        z_hat    = round(bound(z))                     straight-through: d round(b) / d b := 1
        z_q      = z_hat / (L // 2)                    in [-1, 1]
        code     = sum_i (z_hat_i + L_i // 2) prod_{j<i} L_j     mixed radix: [0, prod L) one to one

    Odd L gives z_hat in {-(L-1)/2, ..., (L-1)/2}. Even L has no integer centre, so bound is moved
    down by offset = 1/2 (and z by shift = atanh(offset / half_l), so that bound(0) = 0):
    z_hat in {-L/2, ..., L/2 - 1}. eps widens the range a little, so that the outermost levels
    are reached at finite z. There is no codebook and no loss term: vq = 0.
    """

    eps = 1e-3

    def __init__(self, levels, init=None):
        levels = [int(L) for L in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ needs at least one level count and each at least 2, got {levels}")
        init = init or uniform_init(np.random.default_rng(0))
        xp, self.dtype = backend_of(init)
        L = np.array(levels)                                           # (d,)
        half_l = (L - 1) * (1 + self.eps) / 2
        offset = np.where(L % 2 == 0, 0.5, 0.0)                        # even L: levels at -L/2 .. L/2 - 1
        shift = np.arctanh(offset / half_l)                            # so that bound(0) = 0
        self.half_l, self.offset, self.shift = (xp.asarray(a, self.dtype) for a in (half_l, offset, shift))
        self.half_width = xp.asarray(L // 2, self.dtype)               # (d,) z_q = z_hat / (L // 2)
        self.levels = xp.asarray(L, np.int64)                          # (d,)
        self.basis = xp.asarray(np.cumprod([1] + levels[:-1]), np.int64)  # (d,) mixed radix: 1, L_0, L_0 L_1, ...
        self.K = math.prod(levels)
        self.in_dim = self.out_dim = len(levels)
        self.params, self.grads, self.buffers = {}, {}, {}

    def _bound_and_round(self, z_e):
        xp = array_module(z_e)
        t = xp.tanh(z_e + self.shift)                                  # (N, h, w, d)
        z_hat = xp.round(t * self.half_l - self.offset)                # round(bound(z)): integers
        return t, z_hat

    def _codes(self, z_hat):
        digits = (z_hat + self.half_width).astype(np.int64)           # (N, h, w, d) in [0, L)
        return (digits * self.basis).sum(-1)                           # (N, h, w) mixed-radix number

    def forward(self, z_e, train=True):
        xp = array_module(z_e)
        t, z_hat = self._bound_and_round(z_e)
        z_q = z_hat / self.half_width                                  # (N, h, w, d)
        codes = self._codes(z_hat)
        stats = {"codes": codes, **code_stats(codes, self.K), "vq": xp.zeros((), z_q.dtype)}
        self.cache = t
        return z_q, stats

    def backward(self, dz_q):
        t = self.cache
        dz_hat = dz_q / self.half_width                                # z_q = z_hat / (L // 2)
        dbound = dz_hat                                                # straight-through: round's gradient taken as 1
        return dbound * self.half_l * (1 - t * t)                      # bound = tanh(z + shift) half_l - offset

    def quantize(self, z_e):
        return self._codes(self._bound_and_round(z_e)[1])

    def lookup(self, codes):
        """Codes of any shape -> z_q of shape codes.shape + (d,): the mixed-radix digits, centred
        and normalised."""
        digits = (codes[..., None] // self.basis) % self.levels        # (..., d) in [0, L)
        z_hat = (digits - self.levels // 2).astype(self.dtype)        # (..., d) centred integers
        return z_hat / self.half_width

    def check_codes(self, codes, xp):
        return check_codes(codes, self.K, xp)


class LFQ:
    """Lookup-free quantization: each of the d = bits channels is quantized to its sign.

        q       = +1 where z > 0, else -1              one of the 2^d corners c of the cube
        z_q     = z + sg[q - z]                        straight-through: dz_q / dz = I
        code    = sum_i [q_i > 0] 2^i
        vq      = beta |z - sg[q]|^2 + entropy_weight (E_m[H(p_m)] - H(E_m[p_m]))
        p_m(c)  = softmax_c(-|z_m - c|^2 / T) = softmax_c(2 z_m.c / T)   (|z_m|^2, |c|^2 = d: same for every c)

    The entropy penalty of MAGVIT-v2: a low E_m[H(p_m)] makes each position's soft
    assignment confident, a high H(E_m[p_m]) makes the batch use the codes evenly. By Jensen's
    inequality it lies in [-log 2^d, 0]. It needs the full (M, 2^d) matrix of p, so memory is
    O(M 2^d): bits is capped at MAX_BITS.
    """

    MAX_BITS = 16                                   # (M, 65536) float32 arrays: 256 KiB per position

    def __init__(self, bits, beta=0.25, entropy_weight=0.1, temperature=0.01, init=None):
        # temperature 0.01: the widely used public LFQ (lucidrains' vector-quantize-pytorch and
        # the many LFQ/BSQ codes derived from it) computes softmax(2 z.c * inv_temperature)
        # with inv_temperature = 100; the MAGVIT-v2 paper gives no value. At |z_i| ~ 1, where
        # the commitment term holds z, the soft assignment is then already nearly the hard one,
        # so the penalty acts near sign boundaries and on the batch's code frequencies; with
        # T ~ 1 its per-position term would keep pushing |z| past 1 for confidence, against
        # the commitment term.
        if not 1 <= int(bits) <= self.MAX_BITS:
            raise ValueError(f"LFQ bits must be in [1, {self.MAX_BITS}] (the entropy penalty holds an "
                             f"(M, 2^bits) array), got {bits}")
        init = init or uniform_init(np.random.default_rng(0))
        xp, self.dtype = backend_of(init)
        self.d = int(bits)
        self.K = 2 ** self.d
        self.in_dim = self.out_dim = self.d
        self.beta, self.entropy_weight, self.temperature = beta, entropy_weight, temperature
        self.powers = xp.asarray(2 ** np.arange(self.d), np.int64)     # (d,) 1, 2, 4, ...
        self.corners = self.lookup(xp.arange(self.K))                  # (K, d) row k: the +-1 vector of code k
        self.params, self.grads, self.buffers = {}, {}, {}

    def quantize(self, z_e):
        return ((z_e > 0) * self.powers).sum(-1)                       # (N, h, w) sum_i [z_i > 0] 2^i

    def lookup(self, codes):
        """Codes of any shape -> their +-1 vectors, codes.shape + (d,): the bits, no table."""
        bits = (codes[..., None] // self.powers) % 2                   # (..., d) in {0, 1}
        return (2 * bits - 1).astype(self.dtype)

    def check_codes(self, codes, xp):
        return check_codes(codes, self.K, xp)

    def forward(self, z_e, train=True):
        xp = array_module(z_e)
        N, h, w, d = z_e.shape
        z = z_e.reshape(-1, d)                                         # (M, d)
        M, T = len(z), self.temperature
        q = xp.where(z > 0, 1.0, -1.0).astype(z.dtype)                 # (M, d) the sign, 0 -> -1
        codes = self.quantize(z)                                       # (M,)
        stats = {"codes": codes.reshape(N, h, w), **code_stats(codes, self.K)}
        stats["commitment"] = ((z - q) ** 2).mean()                    # |z - sg[q]|^2: moves z only
        a = (2 / T) * (z @ self.corners.T)                             # (M, K) logits: -|z - c|^2 / T + const
        logp = a - logsumexp(a, 1)                                     # (M, K) log-softmax
        p = xp.exp(logp)                                               # (M, K) p_m(c)
        H = -(p * logp).sum(1)                                         # (M,) per-position entropy H(p_m)
        logpbar = logsumexp(logp, 0)[0] - math.log(M)                  # (K,) log E_m[p_m], never log 0
        pbar = xp.exp(logpbar)                                         # (K,) the batch's mean assignment
        stats["entropy"] = H.mean() - (-(pbar * logpbar).sum())        # E_m[H(p_m)] - H(E_m[p_m])
        stats["vq"] = self.beta * stats["commitment"] + self.entropy_weight * stats["entropy"]
        self.cache = (z, q, p, logp, H, logpbar)
        return q.reshape(z_e.shape), stats

    def backward(self, dz_q):
        z, q, p, logp, H, logpbar = self.cache
        M, T = len(z), self.temperature
        dz = dz_q.reshape(z.shape)                                     # straight-through: decoder's gradient copied to z
        dz = dz + self.beta * 2 * (z - q) / z.size                     # commitment: z only (q is a constant)
        dH_sample = -p * (logp + H[:, None]) / M                       # (M, K) d E_m[H(p_m)] / da: dH/da_j = -p_j (log p_j + H)
        dH_batch = -p * (logpbar - (p @ logpbar)[:, None]) / M         # (M, K) d H(E_m[p_m]) / da, through the mean and softmax
        da = self.entropy_weight * (dH_sample - dH_batch)              # (M, K) the penalty's gradient w.r.t. the logits
        dz = dz + (2 / T) * (da @ self.corners)                        # a = (2 / T) z C^T
        return dz.reshape(dz_q.shape)


class GumbelQuantizer:
    """z_e holds logits over K codes; the decoder gets a relaxed one-hot times a K x D codebook.

        train:  y = softmax((logits + g) / tau),  g = -log(-log(u)), u ~ U(0, 1)    z_q = y E
        eval:   code = argmax(logits)                                                 z_q = E[code]
        vq    = kl_weight KL(q || uniform),  q = softmax(logits),  KL = sum_k q_k log q_k + log K

    The relaxation passes gradients to the logits and to every codebook row in proportion to
    its weight in y; no straight-through step. tau anneals exponentially from `temperature`
    to `temperature_min` over anneal_steps training batches, so that y nears a one-hot and
    training nears the hard evaluation. The noise of training batch t comes from a NumPy
    generator seeded by (seed, t), t being the host counter buffers['step']: CPU and GPU draw
    the same noise, and a resumed run is exact. DALL-E anneals tau from 1 to 1/16.
    """

    def __init__(self, K, D, kl_weight=1e-2, temperature=1.0, temperature_min=1 / 16, anneal_steps=2000, init=None,
                 seed=0):
        # kl_weight 1e-2, measured: on train.py's default data and model (3000 steps), 1e-3 (the
        # ELBO's weight of a per-position KL against a per-element MSE, ~1 / (48 values x 17))
        # left the encoder confident on a few codes (10 % of K used, held-out MSE 0.0053);
        # 1e-2 kept 51 % in use and reached 0.0048. A confident code then costs 1e-2 log K
        # ~ 0.055, the order of the reconstruction loss, which keeps positions from committing
        # to a favourite code early.
        # anneal_steps 2000: tau reaches its minimum two thirds into train.py's default 3000
        # steps, leaving the decoder time with nearly one-hot inputs like those of evaluation.
        if not 0 < temperature_min <= temperature:
            raise ValueError(f"need 0 < temperature_min <= temperature, got {temperature_min} and {temperature}")
        if anneal_steps < 1:
            raise ValueError(f"anneal_steps must be at least 1, got {anneal_steps}")
        init = init or uniform_init(np.random.default_rng(0))
        self.K, self.D = K, D
        self.in_dim, self.out_dim = K, D                               # pre_quant outputs K logits
        self.kl_weight, self.temperature, self.temperature_min = kl_weight, temperature, temperature_min
        self.anneal_steps, self.seed = anneal_steps, seed
        self.codebook = init((K, D), math.sqrt(3 / D))                 # as VectorQuantizer's
        self.params = {"codebook": self.codebook}
        self.grads = {}
        self.buffers = {"step": np.zeros((), np.int64)}                # host counter of training batches: seeds the noise

    def temperature_at(self, step):
        """tau_t = temperature (temperature_min / temperature)^min(1, t / anneal_steps): a Python float."""
        return self.temperature * (self.temperature_min / self.temperature) ** min(1.0, step / self.anneal_steps)

    def quantize(self, z_e):
        return z_e.argmax(-1)                                          # (N, h, w) the most likely code

    def lookup(self, codes):
        return self.codebook[codes]                                    # codes.shape + (D,)

    def check_codes(self, codes, xp):
        return check_codes(codes, self.K, xp)

    def noise(self, step, shape, dtype, xp):
        """Gumbel(0, 1) noise for training batch `step`, drawn on the host, then moved to xp."""
        u = step_rng(self.seed, step).random(shape)    # U[0, 1); u = 0 gives g = -inf: weight 0
        return xp.asarray((-np.log(-np.log(u))).astype(dtype))

    def forward(self, z_e, train=True):
        xp = array_module(z_e)
        N, h, w, K = z_e.shape
        logits = z_e.reshape(-1, K)                                    # (M, K)
        codes = logits.argmax(1)                                       # (M,) the hard code, both modes
        logq = logits - logsumexp(logits, 1)                           # (M, K) log-softmax
        q = xp.exp(logq)                                               # (M, K) the encoder's distribution
        stats = {"codes": codes.reshape(N, h, w), **code_stats(codes, K)}
        stats["kl"] = (q * logq).sum(1).mean() + math.log(K)           # KL(q || uniform), mean over positions
        stats["vq"] = self.kl_weight * stats["kl"]
        step = int(self.buffers["step"])                               # a host counter: no device sync
        tau = self.temperature_at(step)
        stats["temperature"] = xp.asarray(tau, dtype=logits.dtype)
        if train:
            s = (logits + self.noise(step, logits.shape, logits.dtype, xp)) / tau  # (M, K)
            y = xp.exp(s - logsumexp(s, 1))                            # (M, K) relaxed one-hot: softmax(s)
            z_q = y @ self.codebook                                    # (M, D) a mixture of codebook rows
            self.buffers["step"] += 1                                  # in place: the buffer dict holds this array
        else:
            y = one_hot(codes, K, logits.dtype)                  # (M, K) hard
            z_q = self.lookup(codes)                                   # (M, D) = y E, exactly a row
            tau = None                                                 # argmax: no gradient to the logits
        self.cache, self.shape = (y, tau, q, logq), z_e.shape
        return z_q.reshape(N, h, w, self.D), stats

    def backward(self, dz_q):
        y, tau, q, logq = self.cache
        dz_q = dz_q.reshape(-1, self.D)                                # (M, D)
        M = len(dz_q)
        self.grads["codebook"] = y.T @ dz_q                            # z_q = y E: row k gets its weight's share
        dlogits = self.kl_weight * q * (logq - (q * logq).sum(1, keepdims=True)) / M  # KL through q = softmax(logits)
        if tau is not None:
            dy = dz_q @ self.codebook.T                                # (M, K)
            ds = y * (dy - (y * dy).sum(1, keepdims=True))             # through y = softmax(s)
            dlogits = dlogits + ds / tau                               # s = (logits + g) / tau; the noise is a constant
        return dlogits.reshape(self.shape)                              # (N, h, w, K)


# -----------------------------------------------------------------------------
# model


QUANTIZERS = ("vq", "ema", "rvq", "fsq", "lfq", "gumbel")

FIELD_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def config_from_dict(cls, d):
    """A config dataclass from a dict (a config.json section), refusing keys it does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
    return cls(**d)


def is_real(v):
    """A finite real number, and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def check_fields(cfg):
    """Each field of a config dataclass holds a value of its declared type, or a ValueError names
    the field, the value and the type. A bool is not taken for a number (True would pass for
    K = 1) nor a number for a bool, and a real must be finite: inf and nan are never a setting.
    NumPy scalars are accepted and made plain Python values. Ranges are each config's own checks."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        is_bool = isinstance(v, (bool, np.bool_))
        if f.type is bool:
            ok = is_bool
        elif f.type is int:
            ok = isinstance(v, numbers.Integral) and not is_bool
        elif f.type is float:
            ok = is_real(v)
        elif f.type is str:
            ok = isinstance(v, str)
        else:                                                          # a tuple: the config checks it itself
            continue
        if not ok:
            raise ValueError(f"{f.name} must be {FIELD_KINDS[f.type]}, got {v!r}")
        setattr(cfg, f.name, f.type(v))


@dataclass
class Config:
    in_channels: int = 3       # C: image channels
    hidden: int = 128          # H: channels of the encoder and decoder
    res_hidden: int = 32       # RH: hidden channels inside a residual block
    res_blocks: int = 2        # R: residual blocks in the encoder and in the decoder
    levels: int = 1            # 1: VQ-VAE; 2: VQ-VAE-2's top (/8) and bottom (/4) codes
    code_stride: int = 4       # image size / the finest code grid's size: 4 (the paper) or 8; the top is twice it
    top_only_rate: float = 0.0 # two levels: the share of training images decoded from the top code alone
    codebook_size: int = 512   # K: codes in each level's codebook ...
    top_codebook_size: int = 0 # ... but the top level's, when > 0 (two levels; a smaller K_top is easier to model)
    code_dim: int = 64         # D: dimension of a code vector
    beta: float = 0.25         # commitment cost
    quantizer: str = "vq"      # one of QUANTIZERS below
    ema_decay: float = 0.99    # gamma of the EMA quantizer (and of the usage that restarts watch)
    ema_eps: float = 1e-5      # Laplace smoothing of the EMA counts
    kmeans_init: bool = False  # vq, ema, rvq: the codebook starts as k-means of the first batch's z_e
    restart_threshold: float = 0.0  # vq, ema, rvq: > 0 re-seeds a code whose usage falls below it (Jukebox: 1)
    rvq_stages: int = 4        # S: stages of residual VQ
    fsq_levels: tuple = (8, 6, 5)  # L_i of FSQ: prod L_i = 240 codes (the FSQ paper's levels for ~2^8)
    lfq_entropy_weight: float = 0.1  # LFQ: weight of the entropy penalty
    lfq_temperature: float = 0.01    # LFQ: temperature of the code distribution in the entropy penalty
    gumbel_kl_weight: float = 1e-2   # Gumbel: weight of KL(q || uniform)
    gumbel_temperature: float = 1.0  # Gumbel: softmax temperature at the start ...
    gumbel_temperature_min: float = 1 / 16  # ... annealed to this (DALL-E's 1/16) ...
    gumbel_anneal_steps: int = 2000  # ... over this many training steps
    dtype: str = "float32"
    seed: int = 0              # seeds the parameter initialisation

    def __post_init__(self):
        check_fields(self)
        for name in ("in_channels", "hidden", "res_hidden", "codebook_size", "code_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden < 2:
            raise ValueError(f"hidden must be at least 2 (the first layer has hidden // 2), got {self.hidden}")
        if not isinstance(self.res_blocks, int) or self.res_blocks < 0:
            raise ValueError(f"res_blocks must be a non-negative integer, got {self.res_blocks!r}")
        if self.levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {self.levels!r}")
        if not isinstance(self.top_codebook_size, int) or self.top_codebook_size < 0:
            raise ValueError(f"top_codebook_size must be a non-negative integer, got {self.top_codebook_size!r}")
        if self.top_codebook_size and (self.levels != 2 or self.quantizer not in ("vq", "ema", "rvq", "gumbel")):
            raise ValueError(f"top_codebook_size sets the top codebook of two levels of vq, ema, rvq or gumbel codes, "
                             f"not of {self.levels} level(s) of {self.quantizer}")
        if self.code_stride not in (4, 8):
            raise ValueError(f"code_stride must be 4 or 8, got {self.code_stride!r}")
        if not 0 <= self.top_only_rate < 1:
            raise ValueError(f"top_only_rate must be in [0, 1), got {self.top_only_rate!r}")
        if self.top_only_rate > 0 and self.levels != 2:
            raise ValueError(f"top_only_rate {self.top_only_rate} needs two levels (there is no top code to decode "
                             f"from alone with levels = {self.levels})")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if not isinstance(self.fsq_levels, (tuple, list)) or not self.fsq_levels or not all(
                isinstance(L, numbers.Integral) and not isinstance(L, (bool, np.bool_)) and L >= 2
                for L in self.fsq_levels):
            raise ValueError(f"fsq_levels must be integers >= 2, got {self.fsq_levels!r}")
        self.fsq_levels = tuple(int(L) for L in self.fsq_levels)      # a list when read back from JSON
        if self.quantizer == "lfq" and (self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1)
                                        or self.codebook_size > 2**16):
            raise ValueError(f"lfq needs a codebook_size that is a power of 2 from 2 to 2^16 (K = 2^bits), "
                             f"got {self.codebook_size}")
        if (self.kmeans_init or self.restart_threshold) and self.quantizer not in ("vq", "ema", "rvq"):
            raise ValueError(f"kmeans_init and restart_threshold apply to the nearest-neighbour codebooks of vq, ema "
                             f"and rvq, not to {self.quantizer}")
        if not isinstance(self.rvq_stages, int) or self.rvq_stages < 1:
            raise ValueError(f"rvq_stages must be a positive integer, got {self.rvq_stages!r}")
        for name in ("beta", "restart_threshold", "lfq_entropy_weight", "gumbel_kl_weight", "seed"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("ema_eps", "lfq_temperature", "gumbel_temperature", "gumbel_temperature_min",
                     "gumbel_anneal_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.gumbel_temperature_min > self.gumbel_temperature:
            raise ValueError(f"gumbel_temperature_min {self.gumbel_temperature_min} is above gumbel_temperature "
                             f"{self.gumbel_temperature}: the temperature anneals downwards")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def num_codes(self):
        """K of the codes the model emits: the codebook size, or FSQ's implicit prod L_i."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def level_num_codes(self):
        """K of each level's codes, coarsest first: [K] or [K_top, K]."""
        return [self.top_codebook_size or self.num_codes, self.num_codes][2 - self.levels:]

    @property
    def codes_per_position(self):
        """S for residual VQ (codes (N, S, h, w)), else 1 (codes (N, h, w))."""
        return self.rvq_stages if self.quantizer == "rvq" else 1

    @property
    def downsample(self):
        """Image size over the size of the coarsest code grid."""
        return self.code_stride * 2 ** (self.levels - 1)

    @classmethod
    def from_dict(cls, d):
        return config_from_dict(cls, d)


def make_encoder(in_ch, cfg, init, stride=4, input_grad=False):
    """(N, H, W, in_ch) -> features (N, H/stride, W/stride, hidden): the encoder of the paper
    (DeepMind's example) up to its last 1x1 convolution, one 4x4 stride-2 convolution per halving
    (two for the paper's /4, three for --code-stride 8, one for VQ-VAE-2's top level).
    input_grad: whether anything needs the gradient of the input (not for images)."""
    H, RH = cfg.hidden, cfg.res_hidden
    halvings = int(math.log2(stride))
    down = [Conv2d(in_ch, H // 2, 4, stride=2, padding=1, init=init, input_grad=input_grad), ReLU()]  # /2
    ch = H // 2
    for _ in range(halvings - 1):                                      # /4, /8, ...
        down += [Conv2d(ch, H, 4, stride=2, padding=1, init=init), ReLU()]
        ch = H
    down += [Conv2d(ch, H, 3, padding=1, init=init)]
    return Sequential(*down, *[ResidualBlock(H, RH, init) for _ in range(cfg.res_blocks)], ReLU())


def make_decoder(in_ch, out_ch, cfg, init, stride=4):
    """(N, h, w, in_ch) -> (N, stride h, stride w, out_ch), mirroring the encoder."""
    H, RH = cfg.hidden, cfg.res_hidden
    halvings = int(math.log2(stride))
    layers = [Conv2d(in_ch, H, 3, padding=1, init=init),
              *[ResidualBlock(H, RH, init) for _ in range(cfg.res_blocks)], ReLU()]
    ch = H
    for i in range(halvings - 1):                                      # x2, x4, ...: H channels, H/2 before the last
        out = H // 2 if i == halvings - 2 else H
        layers += [ConvTranspose2d(ch, out, 4, stride=2, padding=1, init=init), ReLU()]
        ch = out
    layers += [ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1, init=init)]  # the last doubling, to the image
    return Sequential(*layers)


class TopOnly:
    """VQ-VAE-2 taught to decode from its top code alone (an option of this project, not the
    paper's): in a training batch, each image is, with probability `rate`, decoded with zeros in
    place of its bottom code vectors, which is what decode(top) gives the decoder. The
    reconstruction error of those images reaches only the top level, so the top code has to
    carry what a coarse code can (the background, the shapes' colours and places) instead of
    leaving all of it to the bottom code, and top-only reconstructions show it. Which images
    are drawn depends on (seed, step) alone: a step counter in the checkpoint keeps resume exact."""

    def __init__(self, rate, seed):
        self.rate, self.seed = rate, seed
        self.params, self.grads = {}, {}
        self.buffers = {"step": np.zeros((), np.int64)}                # host counter of training batches

    def keep(self, N, dtype, xp):
        """(N, 1, 1, 1): 0 for the images of this batch decoded from the top alone, else 1."""
        step = int(self.buffers["step"])
        self.buffers["step"] += 1                                      # in place: the buffer dict holds this array
        top_only = step_rng(self.seed, step).random(N) < self.rate
        return xp.asarray(~top_only, dtype=dtype)[:, None, None, None]


def make_quantizer(cfg, init, seed, K=None):
    """The quantizer named by cfg.quantizer, with its settings from cfg (K: another codebook size)."""
    K, D = K or cfg.codebook_size, cfg.code_dim
    health = dict(kmeans_init=cfg.kmeans_init, restart_threshold=cfg.restart_threshold, seed=seed)
    if cfg.quantizer == "vq":
        return VectorQuantizer(K, D, cfg.beta, init, decay=cfg.ema_decay, **health)
    if cfg.quantizer == "ema":
        return VectorQuantizerEMA(K, D, cfg.beta, cfg.ema_decay, cfg.ema_eps, init, **health)
    if cfg.quantizer == "rvq":
        return ResidualVQ(cfg.rvq_stages, K, D, cfg.beta, cfg.ema_decay, cfg.ema_eps, init, **health)
    if cfg.quantizer == "fsq":
        return FSQ(cfg.fsq_levels, init)
    if cfg.quantizer == "lfq":
        return LFQ(int(math.log2(K)), cfg.beta, cfg.lfq_entropy_weight, cfg.lfq_temperature, init)
    return GumbelQuantizer(K, D, cfg.gumbel_kl_weight, cfg.gumbel_temperature, cfg.gumbel_temperature_min,
                           cfg.gumbel_anneal_steps, init, seed)


class VQVAE:
    """Encoder, quantizer(s), decoder; images are float arrays (N, H, W, C), H and W divisible
    by cfg.downsample.

    One level (the paper): x -> encoder -> pre_quant (1x1) -> quantizer -> decoder -> x_hat.

    Two levels (VQ-VAE-2, Razavi, van den Oord, Vinyals 2019, figure 2a):
        f         = encoder(x)                                    (N, H/4, W/4, hidden)
        z_q_top   = top_quantizer(top_pre_quant(top_encoder(f)))  (N, H/8, W/8, D) global structure
        z_q       = quantizer(pre_quant([f, top_decoder(z_q_top)]))  (N, H/4, W/4, D) detail, given the top
        x_hat     = decoder([upsample_top(z_q_top), z_q])
    [a, b] concatenates channels. Each level has its own codebook and VQ loss. /4 is the code
    stride s (cfg.code_stride; 8 halves each grid again), the top is at /2s. With top_only_rate,
    training also decodes some images from z_q_top alone (z_q zeroed; class TopOnly).
    """

    def __init__(self, cfg=None, device=None):
        self.cfg = cfg = cfg or Config()
        self.xp = backend(device)
        init = uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        H, D = cfg.hidden, cfg.code_dim
        self.downsample = cfg.downsample
        self.quantizer = q = make_quantizer(cfg, init, seed=(cfg.seed, 0))  # its sizes set its neighbours'
        self.encoder = make_encoder(cfg.in_channels, cfg, init, stride=cfg.code_stride)
        self.pre_quant = Conv2d(H + D * (cfg.levels - 1), q.in_dim, 1, init=init)
        if cfg.levels == 1:
            self.decoder = make_decoder(q.out_dim, cfg.in_channels, cfg, init, stride=cfg.code_stride)
        else:
            self.top_quantizer = top = make_quantizer(cfg, init, seed=(cfg.seed, 1), K=cfg.level_num_codes[0])
            self.decoder = make_decoder(top.out_dim + q.out_dim, cfg.in_channels, cfg, init, stride=cfg.code_stride)
            self.top_encoder = make_encoder(H, cfg, init, stride=2, input_grad=True)
            self.top_pre_quant = Conv2d(H, top.in_dim, 1, init=init)
            self.top_decoder = make_decoder(top.out_dim, D, cfg, init, stride=2)  # conditions the bottom code
            self.upsample_top = ConvTranspose2d(top.out_dim, top.out_dim, 4, stride=2, padding=1, init=init)  # for the decoder
        self.parts = {"encoder": self.encoder, "pre_quant": self.pre_quant, "quantizer": self.quantizer,
                      "decoder": self.decoder}
        if cfg.levels == 2:
            self.parts.update(top_encoder=self.top_encoder, top_pre_quant=self.top_pre_quant,
                              top_quantizer=self.top_quantizer, top_decoder=self.top_decoder,
                              upsample_top=self.upsample_top)
        if cfg.top_only_rate > 0:
            self.top_only = self.parts["top_only"] = TopOnly(cfg.top_only_rate, seed=(cfg.seed, 2))

    # --- the parts, by name: references to the live arrays, updated in place by Adam
    @property
    def params(self):
        return gather(self.parts, "params")

    @property
    def grads(self):
        return gather(self.parts, "grads")

    @property
    def buffers(self):
        return gather(self.parts, "buffers")

    # --- input checks: a clear ValueError instead of a broadcasting surprise deep inside
    def check_images(self, x):
        C = self.cfg.in_channels
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4 or shape[3] != C:
            raise ValueError(f"expected images of shape (N, H, W, {C}), got shape {shape}")
        if shape[0] < 1:
            raise ValueError(f"expected at least one image, got an empty batch of shape {shape}")
        if shape[1] % self.downsample or shape[2] % self.downsample or shape[1] < 1 or shape[2] < 1:
            raise ValueError(f"image height and width must be positive multiples of {self.downsample}, "
                             f"got {shape[1]} x {shape[2]} (pad or crop the images)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise ValueError(f"expected real-valued images, got dtype {x.dtype}")
        if not bool(array_module(x).isfinite(x).all()):                # checked where x lives: no device sync for host data
            raise ValueError("images contain NaN or infinite values")
        return self.xp.asarray(x, dtype=self.cfg.dtype)

    # --- training: forward caches, backward fills .grads
    def forward(self, x, train=True):
        """Losses of eq. 3 on a batch (for two levels, both VQ terms); `train` lets an EMA
        codebook move. The top level's stats are prefixed 'top_'."""
        x = self.check_images(x)
        f = self.encoder.forward(x)                                    # (N, H/4, W/4, hidden)
        if self.cfg.levels == 1:
            z_q, vq = self.quantizer.forward(self.pre_quant.forward(f), train)  # (N, H/4, W/4, D)
            x_hat = self.decoder.forward(z_q)                          # (N, H, W, C)
            top = {}
        else:
            xp = self.xp
            z_e_top = self.top_pre_quant.forward(self.top_encoder.forward(f))   # (N, H/8, W/8, D)
            z_q_top, top = self.top_quantizer.forward(z_e_top, train)
            d_top = self.top_decoder.forward(z_q_top)                  # (N, H/4, W/4, D)
            z_q, vq = self.quantizer.forward(self.pre_quant.forward(xp.concatenate([f, d_top], -1)), train)
            self.keep = self.top_only.keep(len(x), z_q.dtype, xp) if train and self.cfg.top_only_rate > 0 else None
            if self.keep is not None:                                  # some images decoded from the top alone
                z_q = z_q * self.keep
            x_hat = self.decoder.forward(xp.concatenate([self.upsample_top.forward(z_q_top), z_q], -1))
        recon = ((x_hat - x) ** 2).mean()                              # |x - x_hat|^2
        self.cache = (x, x_hat)
        loss = recon + vq["vq"] + (top["vq"] if top else 0.0)
        return {"loss": loss, "recon": recon, **vq, **{f"top_{k}": v for k, v in top.items()}}

    def recon_grad(self):
        """d recon / d x_hat of the latest forward."""
        x, x_hat = self.cache
        return 2 * (x_hat - x) / x.size                                # recon = mean((x_hat - x)^2)

    @property
    def last_layer(self):
        """G_L of VQGAN's adaptive weight: the decoder's final ConvTranspose2d, whose output is x_hat."""
        return self.decoder.layers[-1]

    def backward(self, dx_hat=None):
        """Fills .grads from the latest forward. dx_hat: the loss's gradient at x_hat, by default
        the reconstruction term's (VQGAN adds its adversarial term's)."""
        if dx_hat is None:
            dx_hat = self.recon_grad()
        d_in = self.decoder.backward(dx_hat)
        if self.cfg.levels == 1:
            df = self.pre_quant.backward(self.quantizer.backward(d_in))  # straight-through + commitment
        else:
            D, H = self.top_quantizer.out_dim, self.cfg.hidden
            d_up, dz_q = d_in[..., :D], d_in[..., D:]                  # x_hat = decoder([upsample_top(z_q_top), z_q])
            if self.keep is not None:                                  # a zeroed bottom code gets no gradient
                dz_q = dz_q * self.keep
            d_pre = self.pre_quant.backward(self.quantizer.backward(dz_q))  # straight-through + commitment
            df, d_top = d_pre[..., :H], d_pre[..., H:]                 # z_e = pre_quant([f, top_decoder(z_q_top)])
            dz_q_top = self.upsample_top.backward(d_up) + self.top_decoder.backward(d_top)  # z_q_top feeds both
            dz_e_top = self.top_quantizer.backward(dz_q_top)           # straight-through + commitment, top level
            df = df + self.top_encoder.backward(self.top_pre_quant.backward(dz_e_top))  # f feeds both levels
        self.encoder.backward(df)

    def train_step(self, x, opt):
        """One step of Adam on the batch x. A step whose gradients are not finite (images far
        outside the model's scale, a learning rate that blew the weights up) raises
        NonFiniteError and leaves the model as it was: what forward moved in the quantizers (EMA
        averages, usage counts, re-seeded or k-means codes) is put back, and Adam changes nothing."""
        with self.kept_unless_finite():
            stats = self.forward(x, train=True)
            self.backward()
            opt.step(self.grads)
        return stats

    @contextlib.contextmanager
    def kept_unless_finite(self):
        """A training step inside this block that raises NonFiniteError leaves the quantizers as
        they were: what forward(train=True) moved in them and in the step counters is put back (the
        optimisers must check every gradient before they change anything)."""
        quantizers = {name: part for name, part in self.parts.items() if name.endswith("quantizer")}
        moved = {**gather(quantizers, "params"), **self.buffers}      # what forward(train=True) moves
        before = {k: v.copy() for k, v in moved.items()}               # a few K x D arrays: cheap
        try:
            yield
        except NonFiniteError:
            for k, v in before.items():
                moved[k][...] = v
            raise

    # --- the tokenizer: images <-> integer codes
    def encode(self, x):
        """Images (N, H, W, C) -> codes (N, H/s, W/s) in [0, K), s the code stride (residual VQ:
        (N, S, H/s, W/s)); for two levels, the pair (top codes at H/2s, bottom codes at H/s)."""
        f = self.encoder.forward(self.check_images(x))
        if self.cfg.levels == 1:
            return self.quantizer.quantize(self.pre_quant.forward(f))
        top = self.top_quantizer.quantize(self.top_pre_quant.forward(self.top_encoder.forward(f)))
        d_top = self.top_decoder.forward(self.top_quantizer.lookup(top))
        return top, self.quantizer.quantize(self.pre_quant.forward(self.xp.concatenate([f, d_top], -1)))

    def decode(self, codes, bottom=None):
        """Codes (N, h, w) -> images (N, s h, s w, C), s the code stride (4 by default). Two
        levels: decode(top, bottom) with top (N, h, w) and bottom (N, 2h, 2w) -> (N, 2s h, 2s w, C);
        with bottom=None the decoder gets zeros in place of the bottom code vectors, which shows
        what the top level carries by itself (trained for with top_only_rate, class TopOnly)."""
        if self.cfg.levels == 1:
            if bottom is not None:
                raise ValueError("this model has one level: decode(codes) takes no bottom codes")
            return self.decoder.forward(self.quantizer.lookup(self.quantizer.check_codes(codes, self.xp)))
        q, top = self.quantizer, self.top_quantizer
        z_q_top = top.lookup(top.check_codes(codes, self.xp))          # (N, h, w, D)
        N, h, w, _ = z_q_top.shape
        if bottom is None:
            z_q = self.xp.zeros((N, 2 * h, 2 * w, q.out_dim), dtype=z_q_top.dtype)
        else:
            z_q = q.lookup(q.check_codes(bottom, self.xp))
            if z_q.shape[:3] != (N, 2 * h, 2 * w):
                raise ValueError(f"bottom codes must have shape {(N, 2 * h, 2 * w)} for top codes of shape "
                                 f"{(N, h, w)}, got {z_q.shape[:3]}")
        return self.decoder.forward(self.xp.concatenate([self.upsample_top.forward(z_q_top), z_q], -1))

    def reconstruct(self, x):
        codes = self.encode(x)
        return self.decode(*codes) if self.cfg.levels == 2 else self.decode(codes)

    # --- checkpoints: .npz, config as a JSON string, loaded with allow_pickle=False
    def state_dict(self):
        """Host copies of every parameter and buffer, by name."""
        return {k: to_numpy(v) for k, v in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state):
        load_arrays({**self.params, **self.buffers}, state, self.xp)

    def save(self, path):
        np.savez(path, config=np.array(json.dumps(asdict(self.cfg))), **self.state_dict())

    @classmethod
    def load(cls, path, device=None):
        return read_checkpoint(cls, Config, path, device)


def load_arrays(live, state, xp):
    """Copy each array of `state` into the live array of the same name, in place (so that an
    optimiser holding the live arrays stays valid). Every name must be there, shaped alike, and
    finite; all are checked before any is copied, so that a bad state leaves the model as it was."""
    arrays = {}                                                        # each read once (an .npz reads on access)
    for k, v in live.items():
        if k not in state:
            raise ValueError(f"checkpoint has no array {k!r}")
        a = arrays[k] = state[k]
        if tuple(a.shape) != v.shape:
            raise ValueError(f"checkpoint array {k!r} has shape {tuple(a.shape)}, model expects {v.shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"checkpoint array {k!r} has dtype {a.dtype}, expected numbers")
        if not bool(array_module(a).isfinite(a).all()):
            raise ValueError(f"checkpoint array {k!r} holds NaN or infinite values: the model it saved had diverged")
    for k, v in live.items():
        v[...] = array_module(v).asarray(arrays[k], dtype=v.dtype)     # host counters stay on the host


def read_checkpoint(cls, config_cls, path, device=None):
    """A model saved by its save(): the config from its JSON string, then the arrays it needs
    (a training checkpoint's optimiser state beside them is left alone). No pickle."""
    with np.load(path, allow_pickle=False) as f:
        if "config" not in f.files:
            raise ValueError(f"{path} is not a {cls.__name__} checkpoint: it has no 'config' entry")
        model = cls(config_cls.from_dict(json.loads(str(f["config"]))), device)
        model.load_state_dict(f)
    return model


# -----------------------------------------------------------------------------
# adversarial training (VQGAN)
#
# Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021,
# https://arxiv.org/abs/2012.09841, sec. 3.1. A decoder trained on the squared error alone puts
# the mean of what it cannot tell apart, and blurs. A patch discriminator D learns to tell real
# images from reconstructions; the VQ-VAE gets a second loss, which blur does not satisfy:
#
#   L_D    = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(sg[x_hat])))    hinge loss: moves D only
#   L_GAN  = -mean D(x_hat)                                              moves the VQ-VAE only
#   L      = recon + vq (eq. 3 above) + lambda L_GAN                     paper eq. 6, without LPIPS
#   lambda = w |grad_{G_L} recon| / (|grad_{G_L} L_GAN| + delta)         paper eq. 7, a constant sg[.]
#
# G_L is the decoder's last layer. VQGAN's code (taming-transformers, calculate_adaptive_weight)
# asks autograd twice for a gradient at G_L's weight, torch.autograd.grad(loss, last_layer,
# retain_graph=True), once per loss. Here the two gradients at x_hat are at hand (recon's is
# 2 (x_hat - x) / n, L_GAN's comes back through D's backward), and G_L's weight gradient is linear
# in its upstream gradient: two calls of ConvTranspose2d.weight_grad, then ONE decoder backward
# with dx_hat = d recon + lambda d L_GAN. PatchDiscriminator below, the losses, and VQGAN's step.


def hinge_d_loss(logits_real, logits_fake):
    """L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) -> (L_D, dL_D / dlogits_real,
    dL_D / dlogits_fake). D is pushed to score real patches at least +1 and reconstructed ones
    at most -1, and no further: a patch beyond its margin gives no gradient."""
    xp = array_module(logits_real)
    short_real = (logits_real < 1).astype(logits_real.dtype)          # 1 where relu(1 - D(x)) is active
    short_fake = (logits_fake > -1).astype(logits_fake.dtype)         # 1 where relu(1 + D(x_hat)) is active
    loss = 0.5 * (xp.maximum(1 - logits_real, 0).mean() + xp.maximum(1 + logits_fake, 0).mean())
    d_real = short_real * (-0.5 / logits_real.size)                   # d/dD(x) of 1/2 mean relu(1 - D(x))
    d_fake = short_fake * (0.5 / logits_fake.size)                    # d/dD(x_hat) of 1/2 mean relu(1 + D(x_hat))
    return loss, d_real, d_fake


def generator_loss(logits_fake):
    """L_GAN = -mean D(x_hat) -> (L_GAN, dL_GAN / dlogits_fake): the VQ-VAE is pushed to make
    reconstructions that D scores as real (VQGAN's g_loss)."""
    return -logits_fake.mean(), array_module(logits_fake).full_like(logits_fake, -1 / logits_fake.size)


def adaptive_weight(g_rec, g_gan, delta=1e-4, max_weight=1e4):
    """lambda = |g_rec| / (|g_gan| + delta), clipped to [0, max_weight] (paper eq. 7, clipped as
    taming-transformers' calculate_adaptive_weight): g_rec and g_gan are the gradients of the
    reconstruction and the adversarial loss at the same weights (the decoder's last layer), so
    lambda L_GAN pushes those weights as hard as the reconstruction does. A constant: no gradient
    flows through it. delta keeps it finite where L_GAN's gradient vanishes."""
    xp = array_module(g_rec)
    norm_rec = xp.sqrt((g_rec * g_rec).sum())                          # |grad_{G_L} recon|
    norm_gan = xp.sqrt((g_gan * g_gan).sum())                          # |grad_{G_L} L_GAN|
    return xp.clip(norm_rec / (norm_gan + delta), 0, max_weight)


def check_finite_grads(grads):
    """NonFiniteError naming the first gradient that holds NaN or inf; one host sync for all."""
    if not grads:
        return
    xp = array_module(next(iter(grads.values())))
    if not bool(xp.stack([xp.isfinite(g).all() for g in grads.values()]).all()):
        bad = next(k for k, g in grads.items() if not bool(xp.isfinite(g).all()))
        raise NonFiniteError(f"the gradient of {bad!r} holds NaN or infinite values: no parameter was changed")


class PatchDiscriminator(Sequential):
    """PatchGAN (Isola et al. 2017) as VQGAN uses it (taming-transformers' NLayerDiscriminator,
    without its batch norm): `layers` 4x4 convolutions of stride 2 with widths w, 2w, 4w, ...
    (at most 8w), a 4x4 of stride 1, each followed by LeakyReLU(0.2), then a 4x4 of stride 1 to
    one logit per patch: (N, H, W, C) -> (N, h, w, 1). Each logit sees a patch of the image (its
    receptive field), so D judges texture and edges everywhere rather than the image as a whole.
    The first convolution keeps its input gradient: the VQ-VAE's adversarial term needs dD/dx_hat."""

    def __init__(self, in_ch, width=64, layers=3, slope=0.2, init=None):
        widths = [width * min(2 ** i, 8) for i in range(layers + 1)]   # w, 2w, 4w, 8w, 8w, ...
        convs = [Conv2d(in_ch, widths[0], 4, stride=2, padding=1, init=init)]                   # /2
        convs += [Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1, init=init) for i in range(1, layers)]  # /2 each
        convs += [Conv2d(widths[layers - 1], widths[layers], 4, stride=1, padding=1, init=init)]  # -1
        super().__init__(*[part for conv in convs for part in (conv, LeakyReLU(slope))],
                         Conv2d(widths[layers], 1, 4, stride=1, padding=1, init=init))           # -1: the logits

    def patches(self, H, W):
        """(h, w) of the logit map for H x W images: each convolution's (size + padding - k) // s + 1."""
        for conv in self.layers[::2]:
            (t, b), (l, r) = conv.padding
            H, W = (H + t + b - conv.kh) // conv.stride + 1, (W + l + r - conv.kw) // conv.stride + 1
        return H, W


class VQGAN:
    """A VQ-VAE trained with VQGAN's adversarial patch loss beside eq. 3 (the section's comment
    gives the formulas). `weight` is w of eq. 7 (taming's discriminator_weight); before step
    `start` the discriminator is neither trained nor used (taming's disc_factor 0), so that it
    meets reconstructions that already look like the images."""

    def __init__(self, model, disc, weight=0.8, start=0):
        self.model, self.disc, self.weight, self.start = model, disc, float(weight), int(start)

    def forward(self, x, train=True, adversarial=True):
        """The losses; with adversarial=False those of the VQ-VAE alone. The adaptive weight needs
        L_GAN's gradient at G_L, so the generator's pass through D runs forward and back here."""
        stats = self.model.forward(x, train)                           # recon + vq, eq. 3
        self.adversarial = adversarial
        if not adversarial:
            return stats
        xp = self.model.xp
        x, x_hat = self.model.cache                                    # (N, H, W, C) each
        # the generator's term, through D as it is before this step
        gan, dlogits_fake = generator_loss(self.disc.forward(x_hat))   # L_GAN = -mean D(x_hat)
        dx_gan = self.disc.backward(dlogits_fake)                      # dL_GAN/dx_hat; the D gradients this pass
                                                                       # leaves in disc.grads are overwritten below
        dx_rec = self.model.recon_grad()                               # d recon / d x_hat
        G_L = self.model.last_layer
        lam = self.weight * adaptive_weight(G_L.weight_grad(dx_rec), G_L.weight_grad(dx_gan))  # eq. 7, sg[]: a constant
        # the discriminator's term: real images and the reconstructions as plain data, sg[x_hat]
        N = len(x)
        logits = self.disc.forward(xp.concatenate([x, x_hat]))         # (2N, h, w, 1): D has no batch statistics,
        disc_loss, d_real, d_fake = hinge_d_loss(logits[:N], logits[N:])  # so one pass of both is two passes
        self.cache = (dx_rec + lam * dx_gan, xp.concatenate([d_real, d_fake]))
        stats.update(loss=stats["loss"] + lam * gan, gan=gan, gan_weight=lam, disc_loss=disc_loss,
                     logits_real=logits[:N].mean(), logits_fake=logits[N:].mean())
        return stats

    def backward(self):
        """Fills model.grads with the gradient of L (lambda held) and disc.grads with L_D's."""
        if not self.adversarial:
            return self.model.backward()
        dx_hat, dlogits = self.cache
        self.model.backward(dx_hat)                                    # eq. 6: d recon + lambda d L_GAN, one pass
        self.disc.backward(dlogits)                                    # L_D: D only (x_hat was data to it)

    def train_step(self, x, opt, disc_opt, step):
        """One step of both Adams at training step `step` (from 0). Both networks' gradients come
        from one forward (taming-transformers runs a second one for D's step, after the VQ-VAE's
        update: there D learns from reconstructions one step newer). Every gradient is checked
        before either optimiser changes anything: a step that is not finite raises NonFiniteError
        and leaves the VQ-VAE (EMA state included), D and both Adams as they were."""
        adversarial = step >= self.start
        with self.model.kept_unless_finite():
            stats = self.forward(x, train=True, adversarial=adversarial)
            self.backward()
            if adversarial:
                check_finite_grads(self.disc.grads)                    # before opt.step, which checks the VQ-VAE's
            opt.step(self.model.grads)
            if adversarial:
                disc_opt.step(self.disc.grads)
        return stats


# -----------------------------------------------------------------------------
# optimiser


class Adam:
    """Kingma & Ba 2015, bias-corrected. Updates the parameter arrays in place.

    The moments of all parameters lie end to end in one vector each (self.m[k] and self.v[k]
    are views of it), and so do the gradients for the step: the update is a few passes over one
    long vector, not a few per parameter (on a GPU, ~2 kernel launches per parameter, not ~14)."""

    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8):
        if not isinstance(params, dict) or not all(hasattr(p, "shape") and hasattr(p, "dtype") for p in params.values()):
            raise ValueError(f"Adam needs a dict of parameter arrays by name (model.params), got {type(params).__name__}")
        if not (is_real(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_real(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (is_real(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.params, self.lr, self.betas, self.eps = params, float(lr), tuple(map(float, betas)), float(eps)
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"Adam needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        xp = array_module(next(iter(params.values()))) if params else np
        dtype = dtypes.pop() if dtypes else np.float32
        self.offsets = np.cumsum([0] + [p.size for p in params.values()])  # parameter i: [offsets[i], offsets[i+1])
        self.m_flat = xp.zeros(int(self.offsets[-1]), dtype)          # first moments, end to end
        self.v_flat = xp.zeros(int(self.offsets[-1]), dtype)          # second moments, end to end
        self.m = self.views(self.m_flat)                               # by name, for the state dict
        self.v = self.views(self.v_flat)
        self.t = 0

    def views(self, flat):
        """{name: the piece of a flat vector that belongs to that parameter, in its shape}."""
        return {k: flat[a:b].reshape(p.shape)
                for (k, p), a, b in zip(self.params.items(), self.offsets[:-1], self.offsets[1:])}

    def step(self, grads):
        if not self.params:
            return
        b1, b2 = self.betas
        xp = array_module(self.m_flat)
        if grads.keys() != self.params.keys():
            raise ValueError(f"gradients for {sorted(set(grads) ^ set(self.params))[:3]}... do not match the parameters "
                             f"this Adam was built for (is it another model's optimiser?)")
        g = xp.empty_like(self.m_flat)
        for k, piece in self.views(g).items():
            if grads[k].shape != piece.shape:                          # assignment would broadcast silently
                raise ValueError(f"gradient {k!r} has shape {grads[k].shape}, its parameter {piece.shape}")
            piece[...] = grads[k]                                      # every gradient, end to end (one copy,
                                                                       # where reshape(-1) of a transposed dW makes two)
        if not bool(xp.isfinite(g).all()):                            # one reduction (on a GPU, one sync a step)
            bad = next(k for k, piece in self.views(g).items() if not bool(xp.isfinite(piece).all()))
            raise NonFiniteError(f"the gradient of {bad!r} holds NaN or infinite values: no parameter was changed")
        self.t += 1
        m, v = self.m_flat, self.v_flat
        m *= b1; m += (1 - b1) * g                                     # m <- b1 m + (1 - b1) g
        v *= b2; v += (1 - b2) * xp.square(g, out=g)                   # v <- b2 v + (1 - b2) g^2 (g is ours to overwrite)
        # lr m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), the bias
        # corrections moved into two scalars (Kingma & Ba, end of section 2): two passes fewer
        lr_t = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        eps_t = self.eps * math.sqrt(1 - b2 ** self.t)
        update = xp.sqrt(v)                                            # in place from here: a fresh multi-MB
        update += eps_t                                                # temporary costs page faults
        update = xp.divide(m, update, out=update)
        update *= lr_t
        for k, u in self.views(update).items():
            self.params[k] -= u                                        # p <- p - lr m_hat / (sqrt(v_hat) + eps)

    def state_dict(self):
        return {"t": np.array(self.t), **{f"m.{k}": to_numpy(a) for k, a in self.m.items()},
                **{f"v.{k}": to_numpy(a) for k, a in self.v.items()}}

    def load_state_dict(self, state):
        """Moments and step from state_dict(); checked whole before anything is copied, so that a
        bad state leaves this optimiser as it was."""
        if "t" not in state or state["t"].shape != () or not np.issubdtype(state["t"].dtype, np.integer) \
                or int(state["t"]) < 0:
            raise ValueError("optimiser state needs its step count 't', an integer >= 0")
        for k in self.params:
            for name, moments in (("m", self.m), ("v", self.v)):
                a = state[f"{name}.{k}"] if f"{name}.{k}" in state else None
                if a is None:
                    raise ValueError(f"optimiser state has no array {name}.{k!r}")
                if a.shape != moments[k].shape or not np.issubdtype(a.dtype, np.floating):
                    raise ValueError(f"optimiser array {name}.{k!r} has shape {a.shape} and dtype {a.dtype}, "
                                     f"expected floats of shape {moments[k].shape} (another model's optimiser?)")
                if not bool(array_module(a).isfinite(a).all()) or (name == "v" and bool((a < 0).any())):
                    raise ValueError(f"optimiser array {name}.{k!r} holds NaN, infinite or (for v) negative values")
        for k in self.params:
            for name, moments in (("m", self.m), ("v", self.v)):
                moments[k][...] = array_module(moments[k]).asarray(state[f"{name}.{k}"])
        self.t = int(state["t"])
