"""The descendants' quantizers, each a drop-in for vqvae.VectorQuantizer behind the same interface,
and the codebook health that keeps a nearest-neighbour codebook in use.

    CodebookHealth   k-means initialisation (SoundStream) and dead-code restarts (Jukebox, Dhariwal
                     et al. 2020) for vq, ema and rvq codebooks

    ResidualVQ       SoundStream (Zeghidour et al. 2021), EnCodec (Defossez et al. 2022): stages of
                     EMA codebooks, each quantizing what the previous left over
    FSQ              finite scalar quantization (Mentzer et al. 2023): each channel rounded to a few
                     levels; no codebook, no loss
    LFQ              lookup-free quantization (MAGVIT-v2, Yu et al. 2023): the sign of each channel,
                     with an entropy penalty
    GumbelQuantizer  DALL-E's dVAE (Ramesh et al. 2021): a Gumbel-softmax relaxed one-hot over K codes

Every quantizer has the interface of vqvae.VectorQuantizer, so the model can hold any of them:
    K, in_dim, out_dim     codes (per stage), channels it takes from pre_quant, channels of z_q
    params, grads, buffers dicts as for layers; buffers are saved state that Adam does not train
    forward(z_e (N, h, w, in_dim), train) -> z_q (N, h, w, out_dim), stats: 'codes', 'perplexity',
                           'usage', 'vq' (its term of the loss) and the parts that 'vq' sums
    backward(dz_q) -> dz_e
    quantize(z_e) -> codes, deterministic; lookup(codes) -> z_q; check_codes(codes, xp)
vqvae.make_quantizer builds them from a vqvae.Config (quantizer, rvq_stages, fsq_levels, lfq_*,
gumbel_*; kmeans_init and restart_threshold for codebook health).
"""
import math
import numbers

import numpy as np

from settings import SettingError

from vqvae import (VectorQuantizerEMA, array_module, check_codes, code_stats, gather, nearest, one_hot,
                   step_rng, uniform_init)


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


# -----------------------------------------------------------------------------
# codebook health: a nearest-neighbour codebook that keeps every code in use


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


class CodebookHealth:
    """Codebook health for vqvae.VectorQuantizer, VectorQuantizerEMA and ResidualVQ's stages (the
    paper has neither); before each training batch is assigned:
    - kmeans_init: on the first batch, the codebook becomes the k-means centroids of that batch's
      encoder outputs, so that every code starts where the data is (as SoundStream does);
    - restart_threshold > 0: dead-code restarts, Jukebox's "random restarts for embeddings"
      (Dhariwal et al. 2020): each code's usage u_k <- decay u_k + (1 - decay) n_k is tracked
      (an EMA codebook's N_k is that already), and a code with u_k < threshold is re-seeded with
      a random encoder output of the batch, its usage reset to the threshold.
    The random choices come from a generator seeded by (seed, step), so a resumed run is exact."""

    def __init__(self, q, kmeans_init, restart_threshold, decay, seed):
        self.K, self.kmeans_init, self.threshold, self.decay, self.seed = q.K, kmeans_init, restart_threshold, decay, seed
        self.buffers = {"step": np.zeros((), np.int64)}                # host counter of training batches
        if "ema_count" in q.buffers:                                   # N_k counts the uses, as in Jukebox
            self.usage = q.buffers["ema_count"]
        elif restart_threshold > 0:
            self.usage = self.buffers["usage"] = array_module(q.codebook).full(q.K, restart_threshold,
                                                                               dtype=q.codebook.dtype)

    def before_batch(self, q, z):
        """Move the codebook of quantizer q before it assigns the encoder outputs z (M, D)."""
        step = int(self.buffers["step"])
        rng = step_rng(self.seed, step)
        if self.kmeans_init and step == 0:
            self.reseed(q, array_module(z).ones(self.K, dtype=bool), kmeans(z, self.K, rng))
        elif self.threshold > 0:
            dead = self.usage < self.threshold                         # (K,) codes not used lately
            self.reseed(q, dead, z[array_module(z).asarray(rng.integers(0, len(z), self.K))])  # a random z_e each
        self.buffers["step"] += 1                                      # in place: the quantizer's buffers hold it

    def reseed(self, q, which, rows):
        q.reseed(which, rows, self.threshold or 1.0)                   # an EMA code's count: the threshold, or 1
        if "usage" in self.buffers:
            self.usage[which] = self.threshold

    def after_batch(self, n_k):
        """Track the usage from the batch's assignments per code n_k (K,)."""
        if "usage" in self.buffers:
            self.usage[...] *= self.decay; self.usage[...] += (1 - self.decay) * n_k  # u_k <- decay u_k + (1 - decay) n_k


def with_health(q, kmeans_init, restart_threshold, decay, seed):
    """q with CodebookHealth when either is asked for; its buffers are saved with q's."""
    if kmeans_init or restart_threshold > 0:
        q.health = CodebookHealth(q, kmeans_init, restart_threshold, decay, seed)
        q.buffers.update(q.health.buffers)
    return q


# -----------------------------------------------------------------------------
# the descendants


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
        self.stages = {f"stage{s}": with_health(VectorQuantizerEMA(K, D, beta, decay, eps, init), kmeans_init,
                                                restart_threshold, decay, (*np.ravel(seed), s)) for s in range(S)}
        self.params, self.grads, self.buffers = {}, {}, gather(self.stages, "buffers")

    def forward(self, z_e, train=True, n_q=None):
        """z_e through the first n_q stages (default all): quantizer dropout (SoundStream) trains
        each batch with a random n_q, so that one model serves every bitrate."""
        self.used = list(self.stages.values())[:self.check_stages(n_q)]  # backward goes through these
        r, z_q, parts = z_e, 0, []
        for q in self.used:
            q_s, stats = q.forward(r, train)                           # the code nearest to the residual r_s
            z_q = z_q + q_s                                            # z_q = sum_s q_s
            r = r - q_s                                                # r_{s+1} = r_s - sg[q_s]
            parts.append(stats)
        stats = {"codes": array_module(z_e).stack([p["codes"] for p in parts], 1)}  # (N, n_q, h, w)
        for k in ("perplexity", "usage"):
            stats[k] = sum(p[k] for p in parts) / len(parts)           # the stages' mean
        stats["commitment"] = sum(p["commitment"] for p in parts)      # sum_s |r_s - sg[q_s]|^2
        stats["vq"] = sum(p["vq"] for p in parts)
        return z_q, stats

    def backward(self, dz_q):
        d = dz_q                                                       # straight-through: decoder's gradient copied to the encoder
        for q in reversed(self.used):
            d = q.backward(d)                                          # + stage s's commitment; dr_{s+1}/dr_s = I passes the rest on
        return d

    def check_stages(self, n_q):
        """n_q, the stages a forward or quantize uses: 1 to S, or None for all S."""
        if n_q is None:
            return self.S
        if isinstance(n_q, bool) or not isinstance(n_q, numbers.Integral) or not 1 <= n_q <= self.S:
            raise ValueError(f"n_q must be a number of stages from 1 to {self.S}, got {n_q!r}")
        return int(n_q)

    def quantize(self, z_e, n_q=None):
        r, codes = z_e, []
        for q in list(self.stages.values())[:self.check_stages(n_q)]:
            codes.append(q.quantize(r))
            r = r - q.lookup(codes[-1])
        return array_module(z_e).stack(codes, 1)                       # (N, n_q, h, w)

    def lookup(self, codes):
        """Codes (N, n, h, w) of the first n stages -> the sum of their codebook rows (N, h, w, D)."""
        return sum(q.lookup(codes[:, s]) for s, q in zip(range(codes.shape[1]), self.stages.values()))

    def check_codes(self, codes, xp, any_stages=False):
        """Codes (N, S, h, w); any_stages: the first n of the S stages, 1 <= n <= S, will do."""
        codes = check_codes(codes, self.K, xp, "(N, S, h, w)")
        if codes.shape[1] != self.S and not (any_stages and codes.shape[1] <= self.S):
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


def check_settings(cfg):
    """The descendants' fields of a vqvae.Config, each a SettingError naming what is wrong."""
    if not isinstance(cfg.fsq_levels, (tuple, list)) or not cfg.fsq_levels or not all(
            isinstance(L, numbers.Integral) and not isinstance(L, (bool, np.bool_)) and L >= 2 for L in cfg.fsq_levels):
        raise SettingError("fsq_levels", f"fsq_levels must be integers >= 2, got {cfg.fsq_levels!r}")
    cfg.fsq_levels = tuple(int(L) for L in cfg.fsq_levels)            # a list when read back from JSON
    K = cfg.codebook_size
    if cfg.quantizer == "lfq" and (K < 2 or K & (K - 1) or K > 2**16):
        raise SettingError("codebook_size", f"lfq needs a codebook_size that is a power of 2 from 2 to 2^16 "
                                            f"(K = 2^bits), got {K}")
    if cfg.gumbel_temperature_min > cfg.gumbel_temperature:
        raise SettingError("gumbel_temperature_min", f"gumbel_temperature_min {cfg.gumbel_temperature_min} is above "
                                                     f"gumbel_temperature {cfg.gumbel_temperature}: the temperature "
                                                     f"anneals downwards")


def make_quantizer(cfg, init, seed, K):
    """The descendant named by cfg.quantizer (rvq, fsq, lfq or gumbel), with K codes per codebook."""
    health = dict(kmeans_init=cfg.kmeans_init, restart_threshold=cfg.restart_threshold, seed=seed)
    if cfg.quantizer == "rvq":
        return ResidualVQ(cfg.rvq_stages, K, cfg.code_dim, cfg.beta, cfg.ema_decay, cfg.ema_eps, init, **health)
    if cfg.quantizer == "fsq":
        return FSQ(cfg.fsq_levels, init)
    if cfg.quantizer == "lfq":
        return LFQ(int(math.log2(K)), cfg.beta, cfg.lfq_entropy_weight, cfg.lfq_temperature, init)
    if cfg.quantizer == "gumbel":
        return GumbelQuantizer(K, cfg.code_dim, cfg.gumbel_kl_weight, cfg.gumbel_temperature,
                               cfg.gumbel_temperature_min, cfg.gumbel_anneal_steps, init, seed)
    raise ValueError(f"no descendant quantizer named {cfg.quantizer!r}")
