"""A gated PixelCNN prior over VQ-VAE codes, with hand-written forward and backward passes.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu, "Conditional Image
Generation with PixelCNN Decoders", NeurIPS 2016, https://arxiv.org/abs/1606.05328

The VQ-VAE turns an image into a grid of integer codes (N, h, w); this model learns
p(codes) = prod_{i,j} p(code[i, j] | the codes before it in raster order)  (paper eq. 1)
and samples new grids one code at a time. Each gated layer (paper Figure 2) has two stacks:

    vertical:   v_pre = conv_v(v) [+ cond]          kernel (r+1, k): rows i-r..i, all k columns
                v_out = tanh(v_pre_f) * sigmoid(v_pre_g)                          (paper eq. 2)
    link:       conv1x1(down_shift(v_pre))          row i gets the vertical stack of rows <= i-1
    horizontal: h_pre = conv_h(h) + link [+ cond]   kernel (1, r+1): row i, columns j-r..j
                h_out = h + conv1x1(tanh(h_pre_f) * sigmoid(h_pre_g))    (no "h +" in layer 1)

with r = k // 2. The vertical stack sees the whole rectangle above (and the current row, which
is why it reaches the horizontal stack only one row down); the horizontal stack sees the row
so far. Together they cover everything before (i, j) with no blind spot. The first layer
shifts its horizontal input one column right (mask type A), so (i, j) never sees its own code.

The convolutional stacks reach only L * r codes back, unless the vertical stacks are dilated:
with `dilation` g > 1 layer l's kernel reads rows g^l apart (rows i-r g^l, .., i-g^l, i), as
WaveNet dilates its causal convolutions along time (van den Oord et al. 2016, "WaveNet: A
Generative Model for Raw Audio", https://arxiv.org/abs/1609.03499): L layers then reach
r (g^L - 1) / (g - 1) rows up, every row of them when g <= r + 1 (for g = 2 and r = 1, the binary
digits of the distance). A spoken clip's codes are a tall grid of one frame per row, and there
the undilated stack's few frames are a few milliseconds. For VQ-VAE-2's top prior (Razavi, van den
Oord, Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2", NeurIPS 2019,
https://arxiv.org/abs/1906.00446) an optional causal self-attention layer after every
`attention_every`-th gated layer lets the horizontal stack at (i, j) read every earlier position
(as in PixelSNAIL, Chen, Mishra, Rohaninejad, Abbeel 2018, https://arxiv.org/abs/1712.09763).
Its bottom prior is conditioned on the top level's codes: with `cond_codebook_size` the prior
embeds integer codes (N, h/f, w/f), passes them through `cond_blocks` residual blocks (the
paper's conditioning stack: not causal, since every top code is given before the bottom ones
are drawn, so that a bottom code also sees the top codes below and to the right of its own),
repeats each over an f x f block, and feeds that map to the same `cond` path as a given map.

Sampling is ancestral, one code at a time in raster order. sample_naive() reruns the whole
forward for every code; sample() computes each pixel of each layer once, row by row, and
returns the same codes for the same seed.

Same conventions as vqvae.py: activations (N, H, W, C), weights (out, in, kh, kw), every layer
has forward -> y, backward(dy) -> dx and `params` / `grads` dicts with the same keys.
"""
import json
import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from settings import SettingError, check, from_dict, setting
from vqvae import (Conv2d, NonFiniteError, ReLU, ResidualBlock, Sequential, array_module, backend, check_codes,
                   conv_matrix, crop_hw, gather, load_arrays, pad_hw, read_checkpoint, step_rng, to_numpy,
                   uniform_init)

# -----------------------------------------------------------------------------
# layers


class Embedding:
    """A learned vector per integer: integer codes of any shape S -> S + (C,), rows of table (K, C)."""

    def __init__(self, K, C, init=None):
        init = init or uniform_init(np.random.default_rng(0))
        self.params = {"table": init((K, C), math.sqrt(3))}           # unit variance, like torch's N(0, 1)
        self.grads = {}

    def forward(self, codes):
        self.cache = codes
        return self.params["table"][codes]                             # S + (C,)

    def backward(self, dy):
        K, C = self.params["table"].shape
        xp = array_module(dy)
        onehot = (self.cache.reshape(-1, 1) == xp.arange(K)).astype(dy.dtype)  # (M, K)
        self.grads["table"] = onehot.T @ dy.reshape(-1, C)            # y = table[codes]: row k sums its positions
        return None                                                    # integer codes have no gradient


def gate(a):
    """tanh(a_f) * sigmoid(a_g) of the two channel halves of a (paper eq. 2); also t and s."""
    xp = array_module(a)
    p = a.shape[-1] // 2
    t = xp.tanh(a[..., :p])
    s = 0.5 * (1 + xp.tanh(0.5 * a[..., p:]))                          # = 1 / (1 + exp(-a_g)), never overflows
    return t * s, t, s


class Gate:
    """(N, H, W, 2p) -> (N, H, W, p): the gated activation of paper eq. 2."""

    def __init__(self):
        self.params, self.grads = {}, {}

    def forward(self, a):
        y, t, s = gate(a)
        self.cache = (t, s)
        return y

    def backward(self, dy):
        t, s = self.cache
        da_f = dy * s * (1 - t * t)                                    # y = t * s, t = tanh(a_f)
        da_g = dy * t * s * (1 - s)                                    # y = t * s, s = sigmoid(a_g)
        return array_module(dy).concatenate([da_f, da_g], axis=-1)    # (N, H, W, 2p)


class Shift:
    """Move an (N, H, W, C) array one row down (axis 1) or one column right (axis 2), zero-filled."""

    def __init__(self, axis):
        self.front = ((1, 0), (0, 0)) if axis == 1 else ((0, 0), (1, 0))  # the zero row / column
        self.back = ((0, 1), (0, 0)) if axis == 1 else ((0, 0), (0, 1))   # the one that falls off
        self.params, self.grads = {}, {}

    def forward(self, x):
        return pad_hw(crop_hw(x, self.back), self.front)               # y[i] = x[i - 1], y[0] = 0

    def backward(self, dy):
        return pad_hw(crop_hw(dy, self.front), self.back)              # dx[i] = dy[i + 1], dx[last] = 0


class Upsample:
    """Nearest-neighbour upsampling by an integer f: (N, h, w, C) -> (N, f h, f w, C), every pixel
    repeated over an f x f block (a top code's embedding over the bottom codes it sits above)."""

    def __init__(self, f):
        self.f = f
        self.params, self.grads = {}, {}

    def forward(self, x):
        return x.repeat(self.f, axis=1).repeat(self.f, axis=2)        # y[i, j] = x[i // f, j // f]

    def backward(self, dy):
        N, H, W, C = dy.shape
        f = self.f
        return dy.reshape(N, H // f, f, W // f, f, C).sum((2, 4))     # x[a, b] feeds its f x f block: sum it


class Dropout:
    """Inverted dropout (Srivastava et al. 2014): in training each number is kept with probability
    1 - p and scaled by 1 / (1 - p), so that its expectation is unchanged and evaluation needs no
    rescaling; at evaluation (no generator given) the layer is the identity. PixelCNN++ and
    PixelSNAIL put it inside each gated residual block, before the block's last convolution."""

    def __init__(self, p):
        self.p = p
        self.params, self.grads = {}, {}

    def forward(self, x, rng=None):
        if rng is None or self.p == 0:
            self.cache = None
            return x
        keep = rng.random(x.shape) >= self.p                           # drawn on the host: NumPy and CuPy alike
        self.cache = array_module(x).asarray(keep.astype(x.dtype) / (1 - self.p))  # (N, H, W, C) mask / (1 - p)
        return x * self.cache

    def backward(self, dy):
        return dy if self.cache is None else dy * self.cache           # y = x * mask / (1 - p)


def rows_to_batch(x, d):
    """(N, H, W, C) -> (d N, ceil(H / d), W, C): the rows i = a d + c of each grid go to grid
    (c, n) as its row a (H zero-padded at the bottom to a multiple of d). A convolution over
    adjacent rows of the result is one over rows d apart of x (the "space to batch" of atrous
    convolutions: the dilated convolution becomes a plain one). Its inverse is batch_to_rows."""
    if d == 1:
        return x
    xp = array_module(x)
    N, H, W, C = x.shape
    Hp = -(-H // d) * d                                                # H rounded up to a multiple of d
    x = xp.concatenate([x, xp.zeros((N, Hp - H, W, C), x.dtype)], axis=1) if Hp > H else x
    return x.reshape(N, Hp // d, d, W, C).transpose(2, 0, 1, 3, 4).reshape(d * N, Hp // d, W, C)


def batch_to_rows(y, d, H):
    """The inverse of rows_to_batch: (d N, Hp / d, W, C) -> (N, H, W, C), the padding rows cut off.
    Both are permutations plus zero rows: each one's adjoint is the other (used as such by backward)."""
    if d == 1:
        return y
    dN, A, W, C = y.shape
    return y.reshape(d, dN // d, A, W, C).transpose(1, 2, 0, 3, 4).reshape(dN // d, A * d, W, C)[:, :H]


class GatedLayer:
    """One gated layer (paper Figure 2): (v, h) -> (v_out, h_out), p channels in each stack.

    Conditioning, added to both pre-activations (paper eq. 4-5): a learned bias per class
    (labels (N,)) and a 1x1 convolution of a spatial map cond (N, h, w, Cc).

    The first layer has no residual connection: its h is the embedding of the code at (i, j)
    itself, and adding it to h_out would show every pixel its own code. Later layers add h,
    which holds only what (i, j) may see.

    dropout > 0 drops numbers of the horizontal gate's output in training, before its 1x1
    convolution (where PixelCNN++ puts it in its gated residual blocks).

    dilation d > 1: conv_v reads rows d apart, i-r d .. i-d, i (on a grid of H rows, min(d, H):
    beyond the grid every row but i is padding either way).
    """

    def __init__(self, p, k, first, num_classes=0, cond_channels=0, init=None, dropout=0.0, dilation=1):
        r = k // 2
        self.first, self.dilation = first, dilation
        self.conv_v = Conv2d(p, 2 * p, (r + 1, k), padding=((r, 0), (r, r)), init=init)  # rows i-r..i
        self.conv_h = Conv2d(p, 2 * p, (1, r + 1), padding=((0, 0), (r, 0)), init=init)  # cols j-r..j
        self.link = Conv2d(2 * p, 2 * p, 1, init=init)                 # vertical -> horizontal
        self.out = Conv2d(p, p, 1, init=init)
        self.gate_v, self.gate_h = Gate(), Gate()
        self.drop = Dropout(dropout)
        self.down, self.right = Shift(1), Shift(2)
        self.parts = {"conv_v": self.conv_v, "conv_h": self.conv_h, "link": self.link, "out": self.out}
        if num_classes:
            self.class_v = self.parts["class_v"] = Embedding(num_classes, 2 * p, init)
            self.class_h = self.parts["class_h"] = Embedding(num_classes, 2 * p, init)
        if cond_channels:
            self.cond_v = self.parts["cond_v"] = Conv2d(cond_channels, 2 * p, 1, init=init)
            self.cond_h = self.parts["cond_h"] = Conv2d(cond_channels, 2 * p, 1, init=init)

    @property
    def params(self):
        return gather(self.parts, "params")

    @property
    def grads(self):
        return gather(self.parts, "grads")

    def conditioning(self, labels, cond):
        """The terms added to v_pre and h_pre: 0.0, or class biases (N, 1, 1, 2p) and/or the
        projected map (N, h, w, 2p)."""
        c_v = c_h = 0.0
        if labels is not None:
            c_v = c_v + self.class_v.forward(labels[:, None, None])    # (N, 1, 1, 2p)
            c_h = c_h + self.class_h.forward(labels[:, None, None])
        if cond is not None:
            c_v = c_v + self.cond_v.forward(cond)                      # (N, h, w, 2p)
            c_h = c_h + self.cond_h.forward(cond)
        return c_v, c_h

    def forward(self, v, h, labels=None, cond=None, rng=None):
        """rng: a generator for dropout's masks in training; None at evaluation."""
        c_v, c_h = self.conditioning(labels, cond)
        H, d = v.shape[1], min(self.dilation, v.shape[1])
        v_pre = batch_to_rows(self.conv_v.forward(rows_to_batch(v, d)), d, H) + c_v  # (N, H, W, 2p), rows <= i
        v_out = self.gate_v.forward(v_pre)                             # (N, H, W, p)
        link = self.link.forward(self.down.forward(v_pre))             # row i: rows <= i-1 only
        h_in = self.right.forward(h) if self.first else h              # mask A: not (i, j) itself
        h_pre = self.conv_h.forward(h_in) + link + c_h                 # (N, H, W, 2p)
        h_out = self.out.forward(self.drop.forward(self.gate_h.forward(h_pre), rng))  # (N, H, W, p)
        if not self.first:
            h_out = h_out + h                                          # residual
        self.cache = (labels is not None, cond is not None, d)
        return v_out, h_out

    def backward(self, dv_out, dh_out):
        """-> dv, dh, dcond (None without a cond map)."""
        has_labels, has_cond, d = self.cache
        dh_pre = self.gate_h.backward(self.drop.backward(self.out.backward(dh_out)))  # h_out = out(drop(gate(h_pre)))
        dh = self.conv_h.backward(dh_pre)                              # h_pre = conv_h(h_in) + ...
        dh = self.right.backward(dh) if self.first else dh + dh_out    # h_in = shift(h); h_out = ... + h
        dlink = self.down.backward(self.link.backward(dh_pre))         # h_pre = ... + link(down(v_pre))
        dv_pre = self.gate_v.backward(dv_out) + dlink                  # v_out = gate(v_pre)
        H = dv_pre.shape[1]                                            # v_pre = rows(conv_v(batch(v))) + ...:
        dv = batch_to_rows(self.conv_v.backward(rows_to_batch(dv_pre, d)), d, H)  # the adjoints, in reverse
        if has_labels:                                                 # the class bias is broadcast over H, W
            self.class_v.backward(dv_pre.sum((1, 2), keepdims=True))   # v_pre = ... + class_v(labels)
            self.class_h.backward(dh_pre.sum((1, 2), keepdims=True))   # h_pre = ... + class_h(labels)
        dcond = None
        if has_cond:
            dcond = self.cond_v.backward(dv_pre) + self.cond_h.backward(dh_pre)  # both pre-activations
        return dv, dh, dcond


def make_head(p, K, init):
    """h (N, h, w, p) -> logits (N, h, w, K): ReLU, 1x1 conv, ReLU, 1x1 conv, pixel by pixel."""
    return Sequential(ReLU(), Conv2d(p, p, 1, init=init), ReLU(), Conv2d(p, K, 1, init=init))


def positional_encoding(H, W, F, xp, dtype):
    """A fixed code for every position of an H x W grid -> (H, W, 4F): sin and cos of the row and
    of the column at F frequencies, periods 4, 8, .., 4 * 2^(F-1) positions.

    Sinusoids rather than raw coordinates: a query can rotate a (sin, cos) pair, so q . k can
    peak at a chosen offset (the row above, the same column) and not only grow with the distance.
    A position's code does not depend on H and W. Computed by NumPy on the host, so that NumPy
    and CuPy see the same numbers."""
    w = 2 * math.pi / (4 * 2.0 ** np.arange(F))                        # (F,) angular frequencies
    rows = np.arange(H)[:, None, None] * w                             # (H, 1, F)
    cols = np.arange(W)[None, :, None] * w                             # (1, W, F)
    pe = [np.broadcast_to(a, (H, W, F)) for a in (np.sin(rows), np.cos(rows), np.sin(cols), np.cos(cols))]
    return xp.asarray(np.concatenate(pe, axis=-1).astype(dtype))       # (H, W, 4F)


def softmax(s):
    """Along the last axis, after subtracting the row maximum (no overflow; -inf gives exactly 0)."""
    xp = array_module(s)
    e = xp.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def split_heads(y, n):
    """(N, H, W, d) -> (N, n, H*W, d/n): head k gets channels k*d/n .. (k+1)*d/n - 1, positions in raster order."""
    N, H, W, d = y.shape
    return y.reshape(N, H * W, n, d // n).transpose(0, 2, 1, 3)       # (N, n, T, e)


def merge_heads(o, H, W):
    """The inverse of split_heads: (N, n, H*W, e) -> (N, H, W, n*e)."""
    N, n, T, e = o.shape
    return o.transpose(0, 2, 1, 3).reshape(N, H, W, n * e)            # (N, H, W, d)


def causal_mask(T, xp, dtype):
    """(T, T): 0 where key s <= query t (raster order), -inf where s > t."""
    t = xp.arange(T)
    mask = xp.zeros((T, T), dtype)                                     # [query t, key s]
    mask[t[None, :] > t[:, None]] = -math.inf                          # later keys: exp(-inf) = 0 weight
    return mask


class CausalSelfAttention:
    """h (N, H, W, C) -> h + out(attention(h)): each position reads every position up to and
    including itself in raster order, however far (PixelSNAIL's attention, VQ-VAE-2's top prior).

        x   = [h, pos]                                 pos: positional_encoding, P = 4F channels
        q, k, v = query(x), key(x), value(h)           1x1 convolutions C (+P) -> d, split into n heads
        a   = softmax(q k^T / sqrt(d/n) + mask)        per head, (T, T) with T = H*W; mask: causal_mask
        h_out = h + out(a v)                           heads merged, 1x1 convolution d -> C, residual

    Why t may attend to itself: in the prior this layer reads the horizontal stack, whose features
    at t are computed from the codes strictly before t (mask A in the first gated layer, which has
    no residual), so attending to positions <= t reads only codes < t. The vertical stack, which
    holds the current row, never passes through here. No row of the mask is all -inf (t sees
    itself), so the softmax never divides by zero. The key's bias adds the same q . b to every
    score of a row, which the softmax ignores: its gradient is always 0 (kept, so that the four
    maps are alike and exchangeable with a PyTorch 1x1 convolution or linear layer).
    """

    def __init__(self, C, d, n, init=None, frequencies=5):
        if d % n:
            raise ValueError(f"the attention width d={d} must be divisible by heads={n}")
        self.n, self.F = n, frequencies
        self.scale = 1 / math.sqrt(d // n)                             # a Python float: no dtype promotion
        P = 4 * frequencies
        self.query = Conv2d(C + P, d, 1, init=init)
        self.key = Conv2d(C + P, d, 1, init=init)
        self.value = Conv2d(C, d, 1, init=init)
        self.out = Conv2d(d, C, 1, init=init)
        self.parts = {"query": self.query, "key": self.key, "value": self.value, "out": self.out}

    @property
    def params(self):
        return gather(self.parts, "params")

    @property
    def grads(self):
        return gather(self.parts, "grads")

    def with_positions(self, h, pos):
        """[h, pos]: pos (H, W, P) appended to the channels of every image in h (N, H, W, C)."""
        xp = array_module(h)
        return xp.concatenate([h, xp.broadcast_to(pos, h.shape[:3] + pos.shape[-1:])], axis=-1)  # (N, H, W, C + P)

    def forward(self, h):
        xp = array_module(h)
        H, W = h.shape[1:3]
        x = self.with_positions(h, positional_encoding(H, W, self.F, xp, h.dtype))  # (N, H, W, C + P)
        q = split_heads(self.query.forward(x), self.n)                 # (N, n, T, e)
        k = split_heads(self.key.forward(x), self.n)                   # (N, n, T, e)
        v = split_heads(self.value.forward(h), self.n)                 # (N, n, T, e)
        s = q @ k.transpose(0, 1, 3, 2) * self.scale + causal_mask(H * W, xp, h.dtype)  # (N, n, T, T)
        a = softmax(s)                                                 # row t: weights of positions 0..t
        o = merge_heads(a @ v, H, W)                                   # (N, H, W, d)
        self.cache = (q, k, v, a)
        return h + self.out.forward(o)                                 # residual

    def backward(self, dy):
        q, k, v, a = self.cache
        H, W, C = dy.shape[1:]
        do = split_heads(self.out.backward(dy), self.n)                # h_out = h + out(o); (N, n, T, e)
        da = do @ v.transpose(0, 1, 3, 2)                              # o = a v
        dv = a.transpose(0, 1, 3, 2) @ do                              # o = a v
        ds = a * (da - (da * a).sum(-1, keepdims=True))                # a = softmax(s); 0 where masked (a = 0)
        dq = ds @ k * self.scale                                       # s = q k^T * scale + mask
        dk = ds.transpose(0, 1, 3, 2) @ q * self.scale                 # s = q k^T * scale + mask
        dx = (self.query.backward(merge_heads(dq, H, W))               # q = query(x)
              + self.key.backward(merge_heads(dk, H, W)))              # k = key(x)
        dh = dy + dx[..., :C]                                          # h_out = h + ...; x = [h, pos], pos is fixed
        return dh + self.value.backward(merge_heads(dv, H, W))         # v = value(h)

    def step(self, h, pos, t, keys, values):
        """The layer at position t alone, for the incremental sampler; caches nothing.
        h (N, 1, 1, C) and pos (P,) at t; keys and values (N, n, T, e) hold the positions before t,
        and get t's here. The attention runs over the cache 0..t: what the mask lets t see."""
        x = self.with_positions(h, pos[None, None])                    # (N, 1, 1, C + P)
        q = split_heads(self.query.apply(x)[0], self.n)                # (N, n, 1, e)
        keys[:, :, t:t + 1] = split_heads(self.key.apply(x)[0], self.n)
        values[:, :, t:t + 1] = split_heads(self.value.apply(h)[0], self.n)
        a = softmax(q @ keys[:, :, :t + 1].transpose(0, 1, 3, 2) * self.scale)  # (N, n, 1, t + 1)
        return h + self.out.apply(merge_heads(a @ values[:, :, :t + 1], 1, 1))[0]  # (N, 1, 1, C)


# -----------------------------------------------------------------------------
# model


@dataclass
class PriorConfig:
    """The prior's settings. train.py's --prior-* flags are the fields with help text, with these
    defaults: PixelCNN(PriorConfig(codebook_size=K, num_classes=C)) is the prior `python train.py`
    trains over one level's codes (docs/prior.md measures each choice). A default of None is set
    by the other settings, as its help says."""
    codebook_size: int = setting(256, low=1)                           # K: codes of the VQ-VAE, one logit each
    channels: int = setting(64, "p: channels of each stack", low=1)
    layers: int = setting(7, "L: gated layers (two levels: 8 each)", low=1)
    kernel: int = setting(3, "k: odd; each layer reaches k // 2 codes further", low=1)
    dilation: int = setting(None, "g: gated layer l's vertical stack reads rows g^l apart, as WaveNet's "
                                  "doubling (at most k // 2 + 1, so that no row is skipped; default: 2 for "
                                  "speech, whose grids are a frame a row; 1, adjacent rows, for images)", low=1,
                            absent=1)
    num_classes: int = setting(0, low=0)       # class-conditional when > 0: labels (N,) in [0, num_classes)
    cond_channels: int = setting(0, low=0)     # spatially conditioned when > 0: cond (N, h, w, cond_channels)
    dtype: str = setting("float32", choices=("float32", "float64"))
    seed: int = setting(0, low=0)              # seeds the parameter initialisation
    attention_every: int = setting(None, "causal self-attention after every so many gated layers of the "
                                         "top-most prior; 0: none (default: one, after the last gated layer; "
                                         "two levels: every 4)", low=0, absent=0)
    heads: int = setting(4, "n: attention heads", low=1)
    attention_dim: int = setting(0, low=0)     # d: width of queries, keys and values, n heads of d/n (0 = channels)
    cond_codebook_size: int = setting(0, low=0)  # > 0: conditioned on codes (N, h/f, w/f), embedded in cond_channels
    cond_upsample: int = setting(1, low=1)     # f: each conditioning code covers an f x f block of the grid
    cond_blocks: int = setting(None, "two levels: residual blocks over the top codes before the bottom prior "
                                     "reads them, so that each bottom code sees the top codes around it, the later "
                                     "ones too; 0: only the one above it (default 2)", low=0, only=("levels", (2,)),
                             absent=0)
    dropout: float = setting(0.0, "in training, of each gated layer's horizontal gate output", low=0, below=1)
    label_dropout: float = setting(None, "in training, the share of grids whose class becomes 'none', so that "
                                         "the prior also learns them without it, for --guidance (default: 0.1 for "
                                         "a class-conditional prior)", low=0, below=1, absent=0.0)

    def __post_init__(self):
        if self.attention_every is None:                              # one attention layer, after the last
            self.attention_every = self.layers
        if self.cond_blocks is None:                                  # VQ-VAE-2's conditioning stack
            self.cond_blocks = 2 if self.cond_codebook_size else 0
        if self.dilation is None:                                     # adjacent rows: the paper's PixelCNN
            self.dilation = 1
        if self.label_dropout is None:                                # classifier-free guidance's training
            self.label_dropout = 0.1 if self.num_classes else 0.0
        check(self)
        if self.kernel % 2 == 0:
            raise SettingError("kernel", f"kernel must be odd (centred on the current column), got {self.kernel}")
        if self.dilation > self.kernel // 2 + 1:
            raise SettingError("dilation", f"dilation={self.dilation} with kernel={self.kernel} would skip rows: a "
                                           f"kernel of {self.kernel // 2 + 1} rows reaches every row for a dilation "
                                           f"of at most {self.kernel // 2 + 1}")
        if self.attention_every > self.layers:
            raise SettingError("attention_every", f"attention_every={self.attention_every} is more than "
                                                  f"layers={self.layers}: no attention layer would be placed")
        if self.attention_every and (self.attention_dim or self.channels) % self.heads:
            raise SettingError("heads", f"the attention width (attention_dim, or channels when 0) = "
                                        f"{self.attention_dim or self.channels} must be divisible by heads={self.heads}")
        if self.cond_codebook_size and not self.cond_channels:
            raise SettingError("cond_codebook_size", "cond_codebook_size needs cond_channels > 0, the width of the "
                                                     "conditioning code embedding")
        if self.label_dropout and not self.num_classes:
            raise SettingError("label_dropout", f"label_dropout={self.label_dropout} needs a class-conditional prior "
                                                f"(num_classes > 0)")
        for name, off in (("cond_upsample", 1), ("cond_blocks", 0)):
            if getattr(self, name) != off and not self.cond_codebook_size:
                raise SettingError(name, f"{name}={getattr(self, name)} applies to conditioning codes only: "
                                         f"set cond_codebook_size too")

    @classmethod
    def from_dict(cls, d):
        return from_dict(cls, d)


class PixelCNN:
    """Codes (N, h, w) -> logits (N, h, w, K) of each code given the codes before it.

    With r = k // 2, the logits at (i, j) see the codes in rows i-1-R .. i-1 over columns
    j-L*r .. j+L*r, and in row i over columns j-1-L*r .. j-1 (clipped to the grid), where the
    vertical stacks reach R = r (1 + g + .. + g^(L-1)) rows up: L*r, or with dilation g = 2 and
    r = 1, 2^L - 1.

    With attention layers they see every code before (i, j) but at most one. An attention layer
    reads the features of every position up to (i, j), and each earlier code has been seen by
    the first gated layer at the position after it, or below it: (a, b+1), or (a+1, w-1) for the
    last column. Only for the code at the end of the row above, (i-1, w-1), is that position
    (i, w-1) later than (i, j): it is seen through the convolutions alone, when w-1 <= j+L*r.
    """

    def __init__(self, cfg=None, device=None):
        self.cfg = cfg = cfg or PriorConfig()
        self.xp = backend(device)
        init = uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        p = cfg.channels
        self.embed = Embedding(cfg.codebook_size, p, init)
        rows = cfg.num_classes + (cfg.label_dropout > 0)                 # + the "no class" label, for guidance
        self.layers = [GatedLayer(p, cfg.kernel, l == 0, rows, cfg.cond_channels, init, cfg.dropout,
                                  cfg.dilation ** l) for l in range(cfg.layers)]
        self.head = make_head(p, cfg.codebook_size, init)
        # the VQ-VAE-2 parts come last, so that the parts above start from the same draws with or without them
        every = cfg.attention_every
        self.attention = {l: CausalSelfAttention(p, cfg.attention_dim or p, cfg.heads, init)  # after gated layer l
                          for l in range(cfg.layers) if every and (l + 1) % every == 0}
        if cfg.cond_codebook_size:
            self.cond_embed = Embedding(cfg.cond_codebook_size, cfg.cond_channels, init)
            self.cond_stack = Sequential(*(ResidualBlock(cfg.cond_channels, cfg.cond_channels, init)
                                           for _ in range(cfg.cond_blocks)))  # not causal: every code is given
            self.upsample = Upsample(cfg.cond_upsample)
        # a host counter of training batches: dropout's masks and the dropped labels come from
        # (seed, step), so that a resumed run draws what the uninterrupted run drew
        self.buffers = {"dropout.step": np.zeros((), np.int64)} if cfg.dropout or cfg.label_dropout else {}
        self.cache = None

    @property
    def parts(self):
        """Every part with parameters, by the prefix of its parameter names."""
        parts = {"embed": self.embed, **{f"layers.{l}": layer for l, layer in enumerate(self.layers)},
                 **{f"attention.{l}": att for l, att in self.attention.items()}, "head": self.head}
        if self.cfg.cond_codebook_size:
            parts["cond_embed"] = self.cond_embed
        if self.cfg.cond_blocks:
            parts["cond_stack"] = self.cond_stack
        return parts

    @property
    def params(self):
        return gather(self.parts, "params")

    @property
    def grads(self):
        return gather(self.parts, "grads")

    # --- input checks: a clear ValueError instead of a broadcasting surprise deep inside
    def check_conditioning(self, shape, labels, cond):
        """labels (N,) and cond (N, h, w, Cc) for a grid of `shape` (N, h, w), as the config asks."""
        N, h, w = shape
        nc, cc = self.cfg.num_classes, self.cfg.cond_channels
        if labels is None and nc:
            raise ValueError(f"this prior is class-conditional (num_classes={nc}): pass labels of shape ({N},)")
        if labels is not None:
            if not nc:
                raise ValueError("labels were given, but this prior has num_classes=0")
            if getattr(labels, "shape", None) != (N,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"expected integer labels of shape ({N},), got shape "
                                 f"{getattr(labels, 'shape', None)} and dtype {getattr(labels, 'dtype', None)}")
            lo, hi = int(labels.min()), int(labels.max())                # where labels live: no device sync for host ones
            none = self.cfg.label_dropout > 0                              # label nc: no class, as trained
            if lo < 0 or hi >= nc + none:
                raise ValueError(f"labels must lie in [0, {nc}){f', or be {nc} for no class' if none else ''}, "
                                 f"got values in [{lo}, {hi}]")
            labels = self.xp.asarray(labels)
        if cond is None and cc and not self.cfg.cond_codebook_size:  # a code-conditioned prior makes its own map
            raise ValueError(f"this prior is spatially conditioned (cond_channels={cc}): "
                             f"pass cond of shape {(N, h, w, cc)}")
        if cond is not None:
            if not cc:
                raise ValueError("cond was given, but this prior has cond_channels=0")
            if getattr(cond, "shape", None) != (N, h, w, cc):
                raise ValueError(f"expected cond of shape {(N, h, w, cc)}, got shape {getattr(cond, 'shape', None)}")
            if not np.issubdtype(cond.dtype, np.number) or np.issubdtype(cond.dtype, np.complexfloating):
                raise ValueError(f"expected a real-valued cond, got dtype {cond.dtype}")
            if not bool(array_module(cond).isfinite(cond).all()):     # where cond lives: no device sync
                raise ValueError("cond contains NaN or infinite values")
            cond = self.xp.asarray(cond, dtype=self.cfg.dtype)
        return labels, cond

    def check_cond_codes(self, shape, cond, cond_codes):
        """cond_codes (N, h/f, w/f) for a grid of `shape` (N, h, w), as the config asks; checked
        before check_conditioning, so that a code-conditioned prior given a map says what it wants."""
        N, h, w = shape
        Kc, f = self.cfg.cond_codebook_size, self.cfg.cond_upsample
        if cond is not None and cond_codes is not None:
            raise ValueError("pass cond (a map) or cond_codes (codes to embed), not both")
        if Kc and (h % f or w % f):
            raise ValueError(f"this prior's cond_upsample={f} needs h and w that are multiples of {f}, "
                             f"got a {h} x {w} grid")
        expected = (N, h // f, w // f)
        if cond_codes is None:
            if Kc:
                raise ValueError(f"this prior is conditioned on codes (cond_codebook_size={Kc}, cond_upsample={f}): "
                                 f"pass cond_codes of shape (N, h/{f}, w/{f}) = {expected}"
                                 + (", not cond" if cond is not None else ""))
            return None
        if not Kc:
            raise ValueError("cond_codes were given, but this prior has cond_codebook_size=0")
        if getattr(cond_codes, "shape", None) != expected or not np.issubdtype(cond_codes.dtype, np.integer):
            raise ValueError(f"expected integer cond_codes of shape (N, h/{f}, w/{f}) = {expected}, got shape "
                             f"{getattr(cond_codes, 'shape', None)} and dtype {getattr(cond_codes, 'dtype', None)}")
        lo, hi = int(cond_codes.min()), int(cond_codes.max())
        if lo < 0 or hi >= Kc:
            raise ValueError(f"cond_codes must lie in [0, {Kc}), got values in [{lo}, {hi}]")
        return self.xp.asarray(cond_codes)

    def cond_map(self, cond_codes):
        """Conditioning codes (N, h/f, w/f) -> the map every gate reads (N, h, w, Cc): each code's
        learned embedding, through the conditioning stack (if any: then each position's features
        also hold its neighbours', within cond_blocks positions each way), repeated over the f x f
        block of codes below it."""
        return self.upsample.forward(self.cond_stack.forward(self.cond_embed.forward(cond_codes)))

    # --- training: loss caches, backward fills .grads
    def forward(self, codes, labels=None, cond=None, cond_codes=None, train=False):
        """train=True: a training batch (dropout on, if the config has it, and the step counted)."""
        codes = check_codes(codes, self.cfg.codebook_size, self.xp)
        cond_codes = self.check_cond_codes(codes.shape, cond, cond_codes)
        labels, cond = self.check_conditioning(codes.shape, labels, cond)
        self.cache = None                                              # backward needs loss(), not this
        if cond_codes is not None:
            cond = self.cond_map(cond_codes)                           # (N, h, w, Cc)
        x = self.embed.forward(codes)                                  # (N, h, w, p)
        v = h = x                                                      # both stacks start from the codes
        rng = None
        if train and (self.cfg.dropout or self.cfg.label_dropout):
            rng = step_rng(self.cfg.seed, int(self.buffers["dropout.step"]))  # this batch's random choices
            self.buffers["dropout.step"] += 1
        if rng is not None and self.cfg.label_dropout:                 # classifier-free guidance's training:
            dropped = self.xp.asarray(rng.random(len(labels)) < self.cfg.label_dropout)  # these grids learn the
            labels = self.xp.where(dropped, self.cfg.num_classes, labels)  # unconditional prior, label "no class"
        for l, layer in enumerate(self.layers):
            v, h = layer.forward(v, h, labels, cond, rng)
            if l in self.attention:
                h = self.attention[l].forward(h)                       # the horizontal stack reads the whole past
        return self.head.forward(h)                                    # (N, h, w, K)

    def loss(self, codes, labels=None, cond=None, cond_codes=None, train=False):
        """Mean cross-entropy -log p(code[i, j] | codes before it), in nats and in bits."""
        logits = self.forward(codes, labels, cond, cond_codes, train)  # checks the inputs once
        codes = self.xp.asarray(codes)
        K = self.cfg.codebook_size
        z = logits.reshape(-1, K)                                      # (M, K)
        z = z - z.max(1, keepdims=True)                                # same softmax, no overflow
        e = self.xp.exp(z)
        total = e.sum(1, keepdims=True)                                # (M, 1)
        logp = z - self.xp.log(total)                                  # log softmax
        onehot = (codes.reshape(-1, 1) == self.xp.arange(K)).astype(z.dtype)  # (M, K)
        nll = -(onehot * logp).sum() / z.shape[0]
        self.cache = (e / total, onehot, logits.shape, cond is not None, cond_codes is not None)  # softmax
        return {"loss": nll, "bits_per_code": nll / math.log(2)}

    def backward(self):
        """Fill .grads from the latest loss(); returns d loss / d cond, or None without cond
        (with cond_codes, the gradient of the map goes on into cond_embed's table)."""
        if self.cache is None:
            raise RuntimeError("backward() needs the cache of loss(): call loss() first")
        probs, onehot, shape, has_cond, has_cond_codes = self.cache
        dlogits = ((probs - onehot) / probs.shape[0]).reshape(shape)   # d mean(-log softmax) / d logits
        dh = self.head.backward(dlogits)
        dv = self.xp.zeros_like(dh)                                    # the last v_out feeds nothing
        dcond = None
        for l in reversed(range(len(self.layers))):
            if l in self.attention:
                dh = self.attention[l].backward(dh)                    # h = attention(h)
            dv, dh, dc = self.layers[l].backward(dv, dh)
            dcond = dc if dcond is None else dcond + dc                # every layer reads cond
        self.embed.backward(dv + dh)                                   # v = h = embed(codes)
        if has_cond_codes:
            # cond = upsample(cond_stack(cond_embed(cond_codes))), taken back in reverse
            d_stack_out = self.upsample.backward(dcond)                # (N, h/f, w/f, Cc)
            self.cond_embed.backward(self.cond_stack.backward(d_stack_out))
        return dcond if has_cond else None

    def train_step(self, codes, opt, labels=None, cond=None, cond_codes=None):
        """One step of Adam on a batch. A step whose gradients are not finite raises
        NonFiniteError and changes nothing (the dropout step counter is put back too)."""
        before = {k: v.copy() for k, v in self.buffers.items()}
        try:
            stats = self.loss(codes, labels, cond, cond_codes, train=True)
            self.backward()
            opt.step(self.grads, self.params)
        except NonFiniteError:
            for k, v in before.items():
                self.buffers[k][...] = v
            raise
        return stats

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
        return read_checkpoint(cls, PriorConfig, path, device)


# -----------------------------------------------------------------------------
# sampling: ancestral, in raster order, one uniform per code drawn up front

TEMPERATURE_MIN, GUIDANCE_MAX = 1e-3, 100.0  # beyond these the logits of a float32 prior can overflow


def pick(logits, u, temperature, top_k=0, top_p=1.0, finite=None):
    """Codes for logits (N, K) and uniforms u (N,): the first k with cumsum(p)[k] > u (inverse CDF)
    for p = softmax(logits / T). Temperature 0 is the limit T -> 0: the argmax. Truncation, as
    users of language models expect it, sets the tail of p to 0 and renormalises what is left:
    top_k > 0 keeps the k most likely codes (Fan et al. 2018), top_p < 1 the fewest most likely
    codes whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020); a code tied
    with the last one kept is kept too. finite (N,) bools: cleared where p was not finite (on the
    device, no sync: the samplers check it once, at the end)."""
    xp = array_module(logits)
    if temperature == 0:
        if finite is not None:
            finite &= xp.isfinite(logits).all(1)
        return logits.argmax(1)
    z = logits / temperature
    e = xp.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)                                    # (N, K)
    if top_k or top_p < 1:
        desc = -xp.sort(-p, axis=1)                                    # (N, K), each row largest first
        last = desc.shape[1] - 1
        if top_k:
            last = min(last, top_k - 1)
        keep_to = xp.full(len(p), last)                                # the index of the last code kept, per row
        if top_p < 1:                                                  # the first index where the mass reaches top_p
            keep_to = xp.minimum(keep_to, (xp.cumsum(desc, axis=1) < top_p).sum(1))
        threshold = xp.take_along_axis(desc, keep_to[:, None], axis=1)  # (N, 1): the smallest kept probability
        p = xp.where(p >= threshold, p, 0)
        p = p / p.sum(1, keepdims=True)
    cdf = xp.cumsum(p, axis=1)                                         # (N, K), nondecreasing
    if finite is not None:
        finite &= xp.isfinite(cdf[:, -1])                              # NaN anywhere in p makes the total NaN
    k = (cdf <= u[:, None]).sum(1)                                     # how many are still <= u
    return xp.minimum(k, logits.shape[1] - 1)                          # rounding may leave cdf[-1] < u


def guide(logits, guidance):
    """Classifier-free guidance (Ho & Salimans 2022): logits (2N, K) of N grids with their classes
    and of the same grids with "no class" -> (N, K), c + (s - 1) (c - u) for the first half c and
    the second u: up to a constant per row the log-probabilities of p_c^s / p_u^(s-1), which
    favours the codes that the class makes more likely than they are without it (s > 1). s = 1:
    the logits as they are (no second half)."""
    if guidance == 1:
        return logits
    N = len(logits) // 2
    c, u = logits[:N], logits[N:]
    return c + (guidance - 1) * (c - u)


def pixel_kernels(xp, p):
    """The fast sampler's two elementwise steps of a layer at a pixel -> (gate_at, residual_at).

        gate_at(h, a)     = tanh(h_f + a_f) * (1 + tanh(h_g + a_g)) / 2, for h = [h_f, h_g] and
                            a = [a_f, a_g] (N, 2p): the gate() of h + a, whose a_g half is halved
        residual_at(y, b, x) = y + b + x

    With NumPy, these expressions. On a GPU each array operation (a slice too) costs a launch or
    a Python call that outweighs the arithmetic on a few hundred numbers: there each step is one
    CuPy ElementwiseKernel doing the same operations in the same order, and the gate reads the
    halves itself (7 calls -> 1, and 2 -> 1). h and a must be C-contiguous for it."""
    if xp is np:
        return (lambda h, a: xp.tanh(h[:, :p] + a[:, :p]) * (0.5 * (1 + xp.tanh(h[:, p:] + a[:, p:]))),
                lambda y, b, x: y + b + x)
    gate = xp.ElementwiseKernel(
        "raw T h, raw T a, int64 p", "T out",
        "const ptrdiff_t f = i / p * 2 * p + i % p;  // a_f of row i / p, channel i % p; a_g is p further\n"
        "out = tanh(h[f] + a[f]) * (T(0.5) * (T(1) + tanh(h[f + p] + a[f + p])));", "vqvae_gate_at")
    residual_at = xp.ElementwiseKernel("T y, T b, T x", "T out", "out = (y + b) + x", "vqvae_residual_at")
    return (lambda h, a: gate(h, a, p, size=h.shape[0] * p).reshape(h.shape[0], p)), residual_at


def _sampling_setup(model, N, h, w, seed, temperature, labels, cond, cond_codes, top_k, top_p, guidance):
    for name, n in (("N", N), ("h", h), ("w", w)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and (temperature == 0 or temperature >= TEMPERATURE_MIN)):
        raise ValueError(f"temperature must be 0 (the most likely code) or a finite number >= {TEMPERATURE_MIN} "
                         f"(below it the logits overflow), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no truncation), got {top_k!r}")
    if not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1: no truncation), got {top_p!r}")
    if not (isinstance(guidance, numbers.Real) and not isinstance(guidance, bool) and math.isfinite(guidance)
            and 0 <= guidance <= GUIDANCE_MAX):
        raise ValueError(f"guidance must be a number in [0, {GUIDANCE_MAX}] (1: none; beyond it the logits "
                         f"overflow), got {guidance!r}")
    if guidance != 1 and not model.cfg.label_dropout:
        raise ValueError(f"guidance={guidance} needs a class-conditional prior trained with label_dropout > 0, "
                         f"which also knows the grids without a class")
    cond_codes = model.check_cond_codes((N, h, w), cond, cond_codes)
    labels, cond = model.check_conditioning((N, h, w), labels, cond)
    xp = model.xp
    u = xp.asarray(np.random.default_rng(seed).random((N, h, w)))      # every uniform, up front
    if guidance != 1:                                                  # the same grids again, without their class:
        labels = xp.concatenate([labels, xp.full_like(labels, model.cfg.num_classes)])  # 2N rows, one code each
        cond, cond_codes = (None if a is None else xp.concatenate([a, a]) for a in (cond, cond_codes))
    codes = xp.zeros((N if guidance == 1 else 2 * N, h, w), dtype=np.int64)
    rule = (float(temperature), int(top_k), float(top_p), xp.ones(N, dtype=bool))  # how pick() chooses a code
    return rule, float(guidance), labels, cond, cond_codes, u, codes


def _pick_guided(logits, u, rule, guidance):
    """pick() on the guided logits; with guidance, the code goes to both halves of the batch."""
    code = pick(guide(logits, guidance), u, *rule)
    return code if guidance == 1 else array_module(code).concatenate([code, code])


def _finite(codes, rule):
    """The samplers' codes, unless a code was drawn from probabilities that were not finite."""
    if not bool(rule[-1].all()):                                       # one sync, at the end
        raise NonFiniteError("the sampling probabilities were not finite (the logits overflowed): no codes returned")
    return codes


def sample_naive(model, N, h, w, seed, temperature=1.0, labels=None, cond=None, cond_codes=None, top_k=0, top_p=1.0,
                 guidance=1.0):
    """h * w full forward passes: the logits at (i, j) are read off a forward of the grid so far.
    Slow, obviously correct. seed: an int or a np.random.Generator. guidance != 1: classifier-free
    guidance (guide()), each forward over the N grids with and without their classes."""
    rule, guidance, labels, cond, cond_codes, u, codes = _sampling_setup(model, N, h, w, seed, temperature, labels,
                                                                         cond, cond_codes, top_k, top_p, guidance)
    for i in range(h):
        for j in range(w):
            logits = model.forward(codes, labels, cond, cond_codes)[:, i, j]  # (N or 2N, K); later codes are still 0
            codes[:, i, j] = _pick_guided(logits, u[:, i, j], rule, guidance)
    return _finite(codes[:N], rule)


def _sampler_state(model, N, h, w):
    """What the fast sampler computes once: the horizontal kernels (1, r+1) and the output 1x1
    convolutions as matrices, and every attention layer's keys and values (a slot per position in
    raster order, filled as the pixels are computed) and positional codes. The gate's sigmoid(a_g)
    = (1 + tanh(a_g / 2)) / 2: the 1/2 (`half`) is folded into the a_g half of W_h and of the
    row's base (a power of two: exact), so that the tanh of the a_g half gives tanh(a_g / 2)."""
    xp, dtype, p = model.xp, model.cfg.dtype, model.cfg.channels
    half = xp.asarray(np.repeat([1.0, 0.5], p).astype(dtype))         # (2p,)
    W_h = [conv_matrix(layer.conv_h.params["W"]) * half for layer in model.layers]  # ((r+1) p, 2p): window -> h_pre
    W_out = [conv_matrix(layer.out.params["W"]) for layer in model.layers]  # (p, p)
    n, e = model.cfg.heads, (model.cfg.attention_dim or p) // model.cfg.heads
    KV = {l: (xp.zeros((N, n, h * w, e), dtype), xp.zeros((N, n, h * w, e), dtype))  # (N, n, h*w, e) each
          for l in model.attention}
    pos = {l: positional_encoding(h, w, att.F, xp, dtype) for l, att in model.attention.items()}  # (h, w, P)
    return half, W_h, W_out, KV, pos


def sample(model, N, h, w, seed, temperature=1.0, labels=None, cond=None, cond_codes=None, top_k=0, top_p=1.0,
           guidance=1.0):
    """The codes of sample_naive (same seed, same uniforms), computing each pixel of each layer once.

    Row by row: once row i-1 is final, every layer's vertical stack is computed for row i-1 only
    (from the cached vertical inputs of rows i-1-r d .. i-1, d apart for a layer of dilation d),
    which gives the links of row i. Then row i left to right: for pixel (i, j) the horizontal
    stack of all layers (from the cached horizontal inputs of columns j-r .. j of row i), the
    head, and the code. The caches are zero-padded exactly as conv_v and conv_h pad, so the
    arithmetic is the forward's (the same sums, some in another order: equal up to rounding,
    like a pixel's matmul and a grid's).

    On a GPU each array operation is a kernel launch for a few hundred numbers, so the pixel loop
    does as few as it can: the weights become matrices once; what a row's horizontal
    pre-activations add to conv_h(h) (link, conditioning, conv_h's bias) is summed once per row;
    a pixel's horizontal convolution is one matmul of a view of its window; the gate, and the
    bias with the residual, are one kernel each (pixel_kernels): about 60 array operations per
    pixel for the default prior (K=512, p=64, L=8), where it took 148.

    An attention layer keeps the keys and values of the pixels computed so far; at pixel (i, j)
    it adds that pixel's and computes the query, the attention over the cache and the output for
    (i, j) alone. Conditioning codes become their map once, up front. With guidance the batch is
    the N grids twice, with and without their classes, and both copies get the guided code.
    """
    rule, guidance, labels, cond, cond_codes, u, codes = _sampling_setup(model, N, h, w, seed, temperature, labels,
                                                                         cond, cond_codes, top_k, top_p, guidance)
    samples, N = N, len(codes)                                         # N: the rows computed (2N with guidance)
    xp, dtype, p, r = model.xp, model.cfg.dtype, model.cfg.channels, model.cfg.kernel // 2
    layers, table = model.layers, model.embed.params["table"]
    model.cache = None                                                 # layers' caches are overwritten
    if cond_codes is not None:
        cond = model.cond_map(cond_codes)                              # (N, h, w, Cc)

    def conditioning_row(layer, a):
        """Row a of the conditioning terms: (c_v, c_h), each 0.0, (N, 1, 1, 2p) or (N, 1, w, 2p)."""
        return layer.conditioning(labels, None if cond is None else cond[:, a:a + 1])

    half, W_h, W_out, KV, pos = _sampler_state(model, N, h, w)
    gate_at, residual_at = pixel_kernels(xp, p)
    # vertical inputs of every layer, padded as conv_v pads: r d zero rows on top (d: the layer's
    # dilation), r columns each side; grid row a is row a + r d here
    D = [min(layer.dilation, h) for layer in layers]
    V = [xp.zeros((N, h + r * d, w + 2 * r, p), dtype) for d in D]   # (N, h + r d, w + 2r, p)
    for i in range(h):
        # 1. every layer's vertical stack on row i-1 -> the links of row i, and with them all that
        #    row i's h_pre adds to conv_h(h) without the bias: base (w, N, 2p) per layer
        base = []
        for l, layer in enumerate(layers):
            if i == 0:
                v_pre = xp.zeros((N, 1, w, 2 * p), dtype)              # the zero row of down_shift
            else:
                rows = V[l][:, i - 1:i + r * D[l]:D[l]]                # rows i-1-r d, .., i-1: (N, r+1, w + 2r, p)
                v_pre = layer.conv_v.apply(rows)[0] + conditioning_row(layer, i - 1)[0]  # (N, 1, w, 2p)
                if l + 1 < len(layers):
                    V[l + 1][:, i - 1 + r * D[l + 1], r:r + w] = gate(v_pre)[0][:, 0]  # v_out of row i-1
            link = layer.link.apply(v_pre)[0]                          # (N, 1, w, 2p)
            base_row = (link + conditioning_row(layer, i)[1] + layer.conv_h.params["b"])[:, 0] * half  # (N, w, 2p)
            base.append(xp.ascontiguousarray(base_row.transpose(1, 0, 2)))  # (w, N, 2p): base[l][j] contiguous
        # 2. row i, pixel by pixel. Horizontal inputs padded as conv_h pads (r zero columns on the
        #    left), one more column for layer 0, whose input is shifted right (mask A)
        H = [xp.zeros((N, w + r + int(layer.first), p), dtype) for layer in layers]  # (N, w + r (+1), p)
        for j in range(w):
            for l, layer in enumerate(layers):
                window = H[l][:, j:j + r + 1].reshape(N, -1)           # (N, (r+1) p): columns j-r..j, a view
                h_conv = window @ W_h[l]                               # (N, 2p): conv_h(h), the a_g half halved
                gated = gate_at(h_conv, base[l][j])                    # tanh(a_f) sigmoid(a_g), as gate(), for
                                                                       # a = conv_h(h) + link + cond + bias
                if layer.first:
                    h_out = gated @ W_out[l] + layer.out.params["b"]   # (N, p)
                else:                                                  # + residual: this layer's h at (i, j)
                    h_out = residual_at(gated @ W_out[l], layer.out.params["b"], H[l][:, j + r])
                if l in model.attention:                               # reads the cached keys and values of 0 .. (i, j)
                    h_out = model.attention[l].step(h_out[:, None, None], pos[l][i, j], i * w + j, *KV[l])[:, 0, 0]
                if l + 1 < len(layers):
                    H[l + 1][:, j + r] = h_out
            logits = model.head.forward(h_out[:, None, None])[:, 0, 0]  # (N, K)
            codes[:, i, j] = code = _pick_guided(logits, u[:, i, j], rule, guidance)
            H[0][:, j + r + 1] = table[code]                           # layer 0 sees it from (i, j+1) on
        V[0][:, i + r * D[0], r:r + w] = table[codes[:, i]]            # the vertical stack, from row i+1 on
    return _finite(codes[:samples], rule)
