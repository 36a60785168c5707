"""VQ-VAE with hand-written forward and backward passes, in NumPy (or CuPy on a GPU).

van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017,
https://arxiv.org/abs/1711.00937

    x --encoder--> z_e(x) --nearest codebook row--> z_q(x) --decoder--> x_hat

    loss = |x - x_hat|^2 + |sg[z_e(x)] - e|^2 + beta |z_e(x) - sg[e]|^2          (paper eq. 3)

sg[.] is the stop-gradient. The decoder's gradient reaches the encoder through the quantizer
unchanged (the straight-through estimator), the codebook term moves only the codebook, and the
commitment term (beta = 0.25) moves only the encoder. With the EMA variant (paper appendix A.1)
the codebook follows moving averages of the encoder outputs instead of its loss term.

Sections: the array backend; layers; the quantizer and its EMA variant; the model and its
config; Adam; then the speed paths, each a faster twin of a plain definition above it, with the
test that proves the two equal. On these layers: vqvae2.py (two levels), quantizers.py (RVQ,
FSQ, LFQ, Gumbel, codebook health), vqgan.py (the adversarial loss), prior.py.

Conventions: activations are channels-last, (N, H, W, C), so that an im2col patch is one
reshape and a matmul's output is the next layer's input; weights are stored as PyTorch stores
them, Conv2d (out, in, kh, kw) and ConvTranspose2d (in, out, kh, kw); every layer has forward(x)
-> y, backward(dy) -> dx, and dicts `params` / `grads` with the same keys; backward uses only
what the latest forward cached.
"""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from settings import SettingError, check, from_dict, is_real, setting

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
    """A step met NaN or infinite values and changed nothing; the message says where."""


def backend(device=None):
    """The array module for `device`: 'cpu' (NumPy), 'gpu' (CuPy) or 'auto' (CuPy when a GPU
    is usable); for None or 'auto', $VQVAE_DEVICE decides first, where it is set."""
    device = (os.environ.get("VQVAE_DEVICE") or "auto" if device in (None, "auto") else device).strip().lower()
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
    """Parameter factory: U(-bound, bound) drawn by a NumPy generator, cast, then moved to the device
    (CPU and GPU runs start from identical weights)."""
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
    """a.sum(0) of a tall (M, C) matrix, as the matvec ones(M) @ a: 10-25x faster than NumPy's sum."""
    return array_module(a).ones(a.shape[0], dtype=a.dtype) @ a


def conv_matrix(W):
    """A Conv2d weight (O, C, kh, kw) as the matrix that im2col patches, (kh, kw, C) flattened,
    multiply: (kh*kw*C, O), a column per output channel. A view for 1x1 kernels, rotated or not."""
    return W.transpose(2, 3, 1, 0).reshape(-1, W.shape[0])


def conv_weight(W_mat, kh, kw):
    """Inverse of conv_matrix: (kh*kw*C, O) -> a Conv2d weight (O, C, kh, kw), as a view."""
    O = W_mat.shape[1]
    return W_mat.reshape(kh, kw, -1, O).transpose(3, 2, 0, 1)


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
        O, C = self.params["W"].shape[:2]
        # speed path: few outputs, no patches to cut; CPU only (a GPU's launches: 9 % slower on an H100)
        if array_module(x) is np and self.grads_from_adjoint() and self.kh * self.kw > 1 and col2im_is_cheaper(C, O):
            y = conv_by_col2im(x, self.params["W"], self.padding)
            y += self.params["b"]
            self.cache = x
            return y
        x_pad = pad_hw(x, self.padding)
        y, _ = self.apply(x_pad)
        # the patches are not kept: MBs held from forward to backward push everything else out of
        # the caches, and backward cutting them again is faster (measured: 5-10 % of a step, single thread)
        self.cache = x if self.grads_from_adjoint() else x_pad
        return y                                                       # (N, Ho, Wo, O)

    def backward(self, dy):
        W = self.params["W"]
        O, C, kh, kw = W.shape
        dy_mat = dy.reshape(-1, O)                                     # (M, O)
        self.grads["b"] = column_sums(dy_mat)                          # y = ... + b
        if self.grads_from_adjoint():                                  # speed path: one im2col for dx and dW
            dx, self.grads["W"] = conv_grads_by_adjoint(dy, self.cache, W, self.padding)
            return dx                                                  # (N, H, W, C)
        x_pad = self.cache
        cols = windows(x_pad, kh, kw, self.stride).reshape(dy_mat.shape[0], -1)  # (M, kh*kw*C), as in conv()
        # y = cols @ W_mat -> dW_mat = cols^T dy; as cols.T @ dy, not (dy.T @ cols).T: OpenBLAS
        # runs this orientation 10-20 % faster at these shapes (long M, short O)
        dW_mat = cols.T @ dy_mat                                       # (kh*kw*C, O), as W_mat
        self.grads["W"] = conv_weight(dW_mat, kh, kw)                  # (O, C, kh, kw)
        if not self.input_grad:
            return None
        return conv_adjoint(dy, W, self.stride, x_pad.shape, self.padding)  # y = conv(pad(x)): dx = its adjoint

    def grads_from_adjoint(self):
        """Whether backward takes dW from the adjoint's patches of dy (a speed path: conv_grads_by_adjoint)."""
        (t, b), (l, r) = self.padding
        return self.input_grad and self.stride == 1 and max(t, b) < self.kh and max(l, r) < self.kw


class ConvTranspose2d:
    """The adjoint of Conv2d plus a bias: every input pixel scatters W[c] * x[n, i, j, c] onto a
    kh x kw patch of the output at (i*s, j*s), then the padding is cropped. Weights (in, out, kh, kw)
    as torch.nn.ConvTranspose2d; output size (H - 1) * s - 2p + k, as there."""

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


class ReLU:
    def __init__(self):
        self.params, self.grads = {}, {}

    def forward(self, x):
        self.cache = x
        return array_module(x).maximum(x, 0)

    def backward(self, dy):
        return dy * (self.cache > 0)                                   # 1 where x > 0, else 0



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
# the quantizer: K, in_dim, out_dim; params, grads and buffers (state Adam does not train);
# forward(z_e, train) -> z_q, stats ('codes', 'perplexity', 'usage', 'vq': its loss terms);
# backward(dz_q) -> dz_e; quantize(z_e) -> codes; lookup(codes) -> z_q (quantizers.py: the others)


def nearest(z, E):
    """Index of the nearest row of E (K, D) for each row of z (M, D) -> (M,).
    |z - e_k|^2 = |z|^2 - 2 z.e_k + |e_k|^2 expanded: memory O(M K), never an (M, K, D)
    array. |z|^2 is the same for every k, so the argmin leaves it out."""
    dist = z @ (-2 * E.T)                                              # (M, K): -2 z.e_k
    dist += (E * E).sum(1)                                             # + |e_k|^2, in place
    return dist.argmin(1)


def one_hot(codes, K, dtype):
    """(M,) integer codes -> (M, K) rows with a single 1."""
    xp = array_module(codes)
    onehot = xp.zeros((len(codes), K), dtype=dtype)
    onehot[xp.arange(len(codes)), codes] = 1                           # one write per row: no repeats
    return onehot


class VectorQuantizer:
    """Nearest-neighbour lookup in a K x D codebook, learned through its loss term (eq. 1-3):
    forward(z_e (N, h, w, D)) -> z_q (N, h, w, D), stats with the codes and the loss parts.
    `health`, when set (quantizers.with_health: k-means start, Jukebox's restarts), may move
    codebook rows to the data before a training batch is assigned; the paper has neither.
    """

    def __init__(self, K, D, beta=0.25, init=None):
        init = init or uniform_init(np.random.default_rng(0))
        self.K, self.D, self.beta = K, D, beta
        self.in_dim = self.out_dim = D
        self.codebook = init((K, D), math.sqrt(3 / D))  # sonnet's VarianceScaling(uniform)
        self.params = {"codebook": self.codebook}
        self.buffers = {}                                # state that is not trained by Adam
        self.grads = {}
        self.health = None

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

    def reseed(self, which, rows, count):
        """Codes where `which` (K,) is true become `rows` (K, D) (codebook health; count: the EMA's).
        Adam's moments of a re-seeded row are left as they were: small next to a jump."""
        self.codebook[...] = array_module(rows).where(which[:, None], rows, self.codebook)

    # --- training
    def _assign(self, z_e, train):
        """Shared by both quantizers: codes, z_q and the usage statistics."""
        N, h, w, D = z_e.shape
        z = z_e.reshape(-1, D)                                         # (M, D)
        if train and self.health:
            self.health.before_batch(self, z)
        codes = self.nearest(z)                                        # (M,)
        z_q = self.lookup(codes)                                       # (M, D), eq. 2
        onehot = one_hot(codes, self.K, z.dtype)                       # (M, K)
        if train and self.health:
            self.health.after_batch(onehot.sum(0))
        return z, z_q, onehot, {"codes": codes.reshape(N, h, w), **code_stats(codes, self.K)}

    def forward(self, z_e, train=True):
        z, z_q, onehot, stats = self._assign(z_e, train)
        sq = ((z - z_q) ** 2).mean()                                   # both terms have this value ...
        stats["codebook"] = sq                                         # |sg[z_e] - e|^2: ... it moves e only
        stats["commitment"] = sq                                       # |z_e - sg[e]|^2: ... it moves z_e only
        stats["vq"] = stats["codebook"] + self.beta * stats["commitment"]
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
    zero-debiased averages instead move an unused code to the origin."""

    def __init__(self, K, D, beta=0.25, decay=0.99, eps=1e-5, init=None):
        super().__init__(K, D, beta, init)
        self.decay, self.eps = decay, eps
        xp = array_module(self.codebook)
        self.params = {}                                               # nothing for Adam
        self.buffers.update(codebook=self.codebook, ema_count=xp.ones(K, dtype=self.codebook.dtype),
                            ema_sum=self.codebook.copy())

    def reseed(self, which, rows, count):
        """As VectorQuantizer's, with N_k = count and m_k = N_k e_k, so that e_k = m_k / N_k still holds."""
        N, m, xp = self.buffers["ema_count"], self.buffers["ema_sum"], array_module(rows)
        N[...] = xp.where(which, count, N)                             # a fresh count
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


# --- what the quantizers share: code statistics and checks, the randomness of a training step


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


def step_rng(seed, step):
    """The generator of one training step's random choices: a function of (seed, step) alone,
    so that a run resumed at any step draws what the uninterrupted run drew."""
    return np.random.default_rng([*np.ravel(seed), step])


# -----------------------------------------------------------------------------
# model


QUANTIZERS = ("vq", "ema", "rvq", "fsq", "lfq", "gumbel")
NEAREST = ("vq", "ema", "rvq")      # the codebooks searched by nearest neighbour: k-means and restarts apply


@dataclass
class Config:
    """The model's settings, train.py's command line (the fields with help text) and its defaults:
    VQVAE(Config()) is the model `python train.py` trains. None: set by the levels (vqvae2.py)."""
    in_channels: int = setting(3, low=1)                               # C: image channels, from the data
    hidden: int = setting(64, "H: channels of the encoder and decoder", low=2)
    res_hidden: int = setting(32, "RH: hidden channels of a residual block", low=1)
    res_blocks: int = setting(2, "R: residual blocks in the encoder and in the decoder", low=0)
    levels: int = setting(1, "1: VQ-VAE; 2: VQ-VAE-2 (vqvae2.py), a top code and a bottom code given it", choices=(1, 2))
    code_stride: int = setting(4, "image size over the (bottom) code grid's size", choices=(2, 4, 8))
    codebook_size: int = setting(256, "K: codes in a codebook (fsq: the product of --fsq-levels)", low=1, short="-K")
    code_dim: int = setting(32, "D: dimension of a code vector", low=1, short="-D")
    beta: float = setting(0.25, "commitment cost", low=0)
    quantizer: str = setting("ema", "vq: the paper's codebook, learned by its loss term; ema: by moving averages "
                                    "(appendix A.1); rvq, fsq, lfq, gumbel: quantizers.py", choices=QUANTIZERS)
    ema_decay: float = setting(0.99, "gamma of the EMA codebook and of the usage restarts watch", above=0, below=1)
    ema_eps: float = setting(1e-5, above=0)                            # Laplace smoothing of the EMA counts
    kmeans_init: bool = setting(None, "vq, ema, rvq: the codebook starts as k-means of the first batch's encoder "
                                      "outputs (default: on for two levels)", only=("quantizer", NEAREST), absent=False)
    restart_threshold: float = setting(None, "vq, ema, rvq: re-seed a code whose moving-average uses per batch fall "
                                             "below this (Jukebox); 0: never (default: 1 for two levels, 0 for one)",
                                       low=0, only=("quantizer", NEAREST), absent=0.0)
    top_only_rate: float = setting(None, "two levels: the share of training images decoded from the top code alone "
                                         "(default 0.25)", low=0, below=1, only=("levels", (2,)), absent=0.0)
    top_codebook_size: int = setting(None, "two levels: K of the top codebook, 0: --codebook-size (default 32; not "
                                           "for fsq, lfq)", low=0, only=("levels", (2,)), absent=0)
    rvq_stages: int = setting(4, "rvq: S, residual stages", low=1)
    fsq_levels: tuple = setting((8, 6, 5), "fsq: levels per channel; the codes are their product (8,6,5: 240)")
    lfq_entropy_weight: float = setting(0.1, "lfq: weight of the entropy penalty", low=0)
    lfq_temperature: float = setting(0.01, "lfq: temperature of the code distribution in the penalty", above=0)
    gumbel_kl_weight: float = setting(1e-2, "gumbel: weight of KL(q || uniform)", low=0)
    gumbel_temperature: float = setting(1.0, "gumbel: softmax temperature at the start ...", above=0)
    gumbel_temperature_min: float = setting(1 / 16, "... annealed to this (DALL-E's 1/16) ...", above=0)
    gumbel_anneal_steps: int = setting(2000, "... over this many training steps", low=1)
    dtype: str = setting("float32", choices=("float32", "float64"))
    seed: int = setting(0, low=0)                                      # the parameters' initialisation

    def __post_init__(self):
        import quantizers, vqvae2               # their own settings (late imports: they import this file)
        vqvae2.set_defaults(self)               # None: the two-level setting, or off for one level
        check(self)
        two = self.levels == 2
        if self.top_only_rate > 0 and not two:
            raise SettingError("top_only_rate", f"top_only_rate {self.top_only_rate} needs two levels (there is no "
                                                f"top code to decode from alone with levels = {self.levels})")
        if self.top_codebook_size and (not two or self.quantizer in ("fsq", "lfq")):
            raise SettingError("top_codebook_size", f"top_codebook_size sets the top codebook of two levels of vq, "
                                                    f"ema, rvq or gumbel codes, not of {self.levels} level(s) of "
                                                    f"{self.quantizer}")
        if (self.kmeans_init or self.restart_threshold) and self.quantizer not in NEAREST:
            raise SettingError("kmeans_init", f"kmeans_init and restart_threshold apply to the nearest-neighbour "
                                              f"codebooks of vq, ema and rvq, not to {self.quantizer}")
        quantizers.check_settings(self)

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
        return from_dict(cls, d)


def make_encoder(in_ch, cfg, init, stride=4, input_grad=False):
    """(N, H, W, in_ch) -> features (N, H/stride, W/stride, hidden): the paper's encoder (DeepMind's
    example) up to its last 1x1 convolution, a 4x4 stride-2 convolution per halving (two for the
    paper's /4, one for VQ-VAE-2's top level). input_grad: whether anything needs dx (not images)."""
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


def make_quantizer(cfg, init, seed, K=None):
    """The quantizer named by cfg.quantizer, with its settings from cfg (K: another codebook size)."""
    K = K or cfg.codebook_size
    if cfg.quantizer == "vq":
        q = VectorQuantizer(K, cfg.code_dim, cfg.beta, init)
    elif cfg.quantizer == "ema":
        q = VectorQuantizerEMA(K, cfg.code_dim, cfg.beta, cfg.ema_decay, cfg.ema_eps, init)
    import quantizers                          # the descendants, built on this file (a late import: they import it)
    if cfg.quantizer not in ("vq", "ema"):
        return quantizers.make_quantizer(cfg, init, seed, K)
    return quantizers.with_health(q, cfg.kmeans_init, cfg.restart_threshold, cfg.ema_decay, seed)


class VQVAE:
    """Encoder, quantizer, decoder: x -> encoder -> pre_quant (1x1) -> quantizer -> decoder -> x_hat.
    Images are float arrays (N, H, W, C), H and W divisible by cfg.downsample. Two levels are
    vqvae2.VQVAE2, a subclass; make_model(cfg) builds whichever cfg asks for."""

    def __init__(self, cfg=None, device=None):
        self.cfg = cfg = cfg or Config()
        if cfg.levels != 1:
            raise ValueError("a model of two levels is vqvae2.VQVAE2; vqvae.make_model(cfg) builds either")
        self.xp = backend(device)
        init = uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        self.downsample = cfg.downsample
        self.quantizer = q = make_quantizer(cfg, init, seed=(cfg.seed, 0))  # its sizes set its neighbours'
        self.encoder = make_encoder(cfg.in_channels, cfg, init, stride=cfg.code_stride)
        self.pre_quant = Conv2d(cfg.hidden, q.in_dim, 1, init=init)
        self.decoder = make_decoder(q.out_dim, cfg.in_channels, cfg, init, stride=cfg.code_stride)
        self.parts = {"encoder": self.encoder, "pre_quant": self.pre_quant, "quantizer": self.quantizer,
                      "decoder": self.decoder}

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
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"expected float images on the model's scale, (pixels / 255 - 0.5) / 0.25 as "
                             f"datasets.to_model gives them, got dtype {x.dtype}")
        peak = float(array_module(x).abs(x).max())                     # where x lives: no device sync for host data
        if not peak <= 8:                                              # the scale gives at most 2; NaN fails too
            raise ValueError("images contain NaN or infinite values" if not math.isfinite(peak) else f"images must be "
                             f"on the model's scale, within [-2, 2] as datasets.to_model gives them; got up to {peak:.4g}")
        return self.xp.asarray(x, dtype=self.cfg.dtype)

    # --- training: forward caches, backward fills .grads
    def forward(self, x, train=True):
        """The loss of eq. 3 and its parts on a batch; `train` lets an EMA codebook move."""
        x = self.check_images(x)
        z_e = self.pre_quant.forward(self.encoder.forward(x))          # (N, H/4, W/4, D)
        z_q, vq = self.quantizer.forward(z_e, train)                   # nearest codes, their loss terms
        x_hat = self.decoder.forward(z_q)                              # (N, H, W, C)
        recon = ((x_hat - x) ** 2).mean()                              # |x - x_hat|^2
        self.cache = (x, x_hat)
        return {"loss": recon + vq["vq"], "recon": recon, **vq}

    def recon_grad(self):
        """d recon / d x_hat of the latest forward."""
        x, x_hat = self.cache
        return 2 * (x_hat - x) / x.size                                # recon = mean((x_hat - x)^2)

    def backward(self, dx_hat=None):
        """Fills .grads from the latest forward. dx_hat: the loss's gradient at x_hat, by default
        the reconstruction term's (VQGAN adds its adversarial term's)."""
        dz_q = self.decoder.backward(self.recon_grad() if dx_hat is None else dx_hat)
        dz_e = self.quantizer.backward(dz_q)                           # straight-through + commitment
        self.encoder.backward(self.pre_quant.backward(dz_e))

    def train_step(self, x, opt):
        """One step of Adam on the batch x. A step whose gradients are not finite (images far
        outside the model's scale, a learning rate that blew the weights up) raises
        NonFiniteError and leaves the model as it was: what forward moved in the quantizers (EMA
        averages, usage counts, re-seeded or k-means codes) is put back, and Adam changes nothing."""
        with self.kept_unless_finite():
            stats = self.forward(x, train=True)
            self.backward()
            opt.step(self.grads, self.params)
        return stats

    @contextlib.contextmanager
    def kept_unless_finite(self):
        """A training step inside this block that raises NonFiniteError leaves the quantizers as they
        were (the optimisers check every gradient before they change anything)."""
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
        (N, S, H/s, W/s))."""
        return self.quantizer.quantize(self.pre_quant.forward(self.encoder.forward(self.check_images(x))))

    def decode(self, codes, bottom=None):
        """Codes (N, h, w) -> images (N, s h, s w, C), s the code stride (4 by default)."""
        if bottom is not None:
            raise ValueError("this model has one level: decode(codes) takes no bottom codes")
        return self.decoder.forward(self.quantizer.lookup(self.quantizer.check_codes(codes, self.xp)))

    def reconstruct(self, x):
        return self.decode(self.encode(x))

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
        """The model saved at path, one level or two (vqvae2.VQVAE2)."""
        return read_checkpoint(VQVAE, Config, path, device, make=make_model)


def make_model(cfg=None, device=None):
    """The model cfg describes: VQVAE, or for two levels vqvae2.VQVAE2 (a late import: it imports this file)."""
    if cfg is not None and cfg.levels == 2:
        import vqvae2
        return vqvae2.VQVAE2(cfg, device)
    return VQVAE(cfg, device)


def load_arrays(live, state, xp, what="checkpoint", whose="model"):
    """Copy each array of `state` into the live array of the same name, in place (so that an
    optimiser holding the live arrays stays valid). Every name must be there, shaped alike, and
    finite; all are checked before any is copied, so that a bad state leaves the model as it was."""
    arrays = {}                                                        # each read once (an .npz reads on access)
    for k, v in live.items():
        if k not in state:
            raise ValueError(f"{what} has no array {k!r}")
        a = arrays[k] = state[k]
        if tuple(a.shape) != v.shape:
            raise ValueError(f"{what} array {k!r} has shape {tuple(a.shape)}, {whose} expects {v.shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{what} array {k!r} has dtype {a.dtype}, expected numbers")
        if not bool(array_module(a).isfinite(a).all()):
            raise ValueError(f"{what} array {k!r} holds NaN or infinite values: the model it saved had diverged")
    for k, v in live.items():
        v[...] = array_module(v).asarray(arrays[k], dtype=v.dtype)     # host counters stay on the host


def read_checkpoint(cls, config_cls, path, device=None, make=None):
    """A model saved by its save(): the config from its JSON string, the model (cls, or make(config,
    device)), then the arrays it needs (a training checkpoint's optimiser state beside them is left
    alone). No pickle."""
    with np.load(path, allow_pickle=False) as f:
        if "config" not in f.files:
            raise ValueError(f"{path} is not a {cls.__name__} checkpoint: it has no 'config' entry")
        model = (make or cls)(config_cls.from_dict(json.loads(str(f["config"]))), device)
        model.load_state_dict(f)
    return model


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

    def step(self, grads, params=None):
        """One update; params (a model's .params) must be the very arrays this Adam was made for."""
        if params is not None and (params.keys() != self.params.keys() or any(params[k] is not p for k, p in
                                                                                  self.params.items())):
            raise ValueError("this Adam was built for another model's parameters; make one for this model: "
                             "vqvae.Adam(model.params)")
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
        """Moments and step from state_dict(); checked whole before anything is copied (load_arrays),
        so that a bad state leaves this optimiser as it was."""
        t = state["t"] if "t" in state else None
        if t is None or t.shape != () or not np.issubdtype(t.dtype, np.integer) or int(t) < 0:
            raise ValueError("optimiser state needs its step count 't', an integer >= 0")
        if any(f"v.{k}" in state and bool((state[f"v.{k}"] < 0).any()) for k in self.params):
            raise ValueError("optimiser state holds negative second moments v")
        moments = {**{f"m.{k}": a for k, a in self.m.items()}, **{f"v.{k}": a for k, a in self.v.items()}}
        load_arrays(moments, state, array_module(self.m_flat), "optimiser state", "this Adam (another model's optimiser?)")
        self.t = int(t)


def lr_at(step, peak, warmup, end, floor):
    """A learning rate at a step (from 0): up linearly from 0 to `peak` over `warmup` steps, then
    down linearly to floor * peak at step `end`, and that after it. Adam's first steps, with
    second moments estimated from a few batches, are the least reliable: the warm-up keeps them
    small. The decay ends training at a low rate, where the last steps average out the
    batch-to-batch noise instead of following it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    left = max(0.0, (end - step) / max(1, end - warmup))               # 1 at the peak, 0 from `end` on
    return peak * (floor + (1 - floor) * left)


# -----------------------------------------------------------------------------
# speed paths: faster twins of the plain definitions above, each proven equal by a test. The matmuls
# run near the CPU's peak; these cut im2col's copies and NumPy's one-core elementwise work (docs/speed.md).


def rot180(W):
    """(O, C, kh, kw) -> (C, O, kh, kw): the kernel rotated by 180 degrees, in and out swapped,
    of the adjoint of a stride-1 convolution (a view; rot180(rot180(W)) is W)."""
    return W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)


def col2im_is_cheaper(c_in, c_out):
    """Which way of a convolution-like product costs less: im2col copies kh*kw*c_in numbers per output
    pixel before one matmul; col2im multiplies each input pixel by all taps at once and adds kh*kw*c_out
    numbers per pixel back in strided slices, each costing about four copies (measured: a 3x3 from 128
    to 32 channels, 1.26 -> 0.84 ms for batch 32 of 7x7)."""
    return 4 * c_out <= c_in


def conv_adjoint(dy, W, stride, x_pad_shape, crop=((0, 0), (0, 0))):
    """crop_hw(conv_adjoint_by_col2im(dy, W, stride, x_pad_shape), crop), computed as a convolution
    where the stride divides the kernel: col2im's kh*kw strided adds run on one core in NumPy, a
    matmul on all. A padded input the stride does not divide is extended by zero rows (columns) to
    a multiple of it, dy by the zero outputs they would add, and the extension cropped again: the
    first Ho x Wo outputs read the same pixels. Fold each s x s block of pixels into channels
    (space-to-depth): the convolution becomes a stride-1 one with kernel (kh/s, kw/s), whose adjoint
    is a convolution of the zero-padded dy with the kernel rotated by 180 degrees, in/out swapped;
    unfold the blocks again. The crop (the forward's padding) is taken from dy's padding where whole
    blocks allow it, so the border that would be cropped is never computed (a 3x3 conv on 8x8: 36 %
    of the work). Proved equal by test_fast_conv_adjoint_equals_the_col2im_definition and its
    cropped twin."""
    O, C, kh, kw = W.shape
    N, Hp, Wp, _ = x_pad_shape
    s = stride
    if kh % s or kw % s:
        return conv_adjoint_by_col2im(dy, W, stride, x_pad_shape, crop)
    (t, b), (l, r) = crop
    eh, ew = -Hp % s, -Wp % s                                          # rows, columns short of whole blocks
    if eh or ew:
        Ho, Wo = (Hp + eh - kh) // s + 1, (Wp + ew - kw) // s + 1      # outputs of the extended input
        dy = pad_hw(dy, ((0, Ho - dy.shape[1]), (0, Wo - dy.shape[2])))  # the added outputs: no gradient
        return conv_adjoint(dy, W, s, (N, Hp + eh, Wp + ew, C), ((t, b + eh), (l, r + ew)))
    bh, bw = kh // s, kw // s
    W_blocks = W.reshape(O, C, bh, s, bw, s).transpose(0, 3, 5, 1, 2, 4).reshape(O, s * s * C, bh, bw)
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
    """conv(pad_hw(x, padding), W, 1) in the col2im form, for few output channels: the adjoint of the
    convolution with the kernel rotated (in/out swapped) on the 'full' output that every tap reaches,
    cropped by kernel - 1 - padding. Proved by test_conv2d_with_few_outputs_equals_the_direct_loop."""
    O, C, kh, kw = W.shape
    N, H, Wd, _ = x.shape
    (t, b), (l, r) = padding
    full = (N, H + kh - 1, Wd + kw - 1, O)
    return conv_adjoint_by_col2im(x, rot180(W), 1, full, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r)))


def conv_grads_by_adjoint(dy, x, W, padding):
    """(dx, dW) of a stride-1 Conv2d whose padding is under its kernel, from one im2col: dx is the
    convolution of the padded dy with the rotated kernel (see conv_adjoint), and the patches of dy
    it cuts, one row per input pixel, also give dW[o, c, u, v] = sum_p x[p, c] dy[p + (t - u, l - v), o]
    (the forward's patches, cold in memory by now, are not read again). Proved equal to the plain
    backward by test_conv2d_weight_gradient_from_the_adjoints_patches_equals_cols_transpose_dy."""
    O, C, kh, kw = W.shape
    (t, b), (l, r) = padding
    dx, dcols = conv(pad_hw(dy, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r))), rot180(W), 1)
    dW_rot_mat = dcols.T @ x.reshape(-1, C)                            # (kh*kw*O, C), as conv_matrix(rot180(W))
    return dx, rot180(conv_weight(dW_rot_mat, kh, kw))                 # dx (N, H, W, C), dW (O, C, kh, kw)
