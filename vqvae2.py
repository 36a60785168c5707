"""VQ-VAE-2: a top code for the global structure and a bottom code given it, on vqvae.py's layers.

Razavi, van den Oord, Vinyals, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
NeurIPS 2019, https://arxiv.org/abs/1906.00446, figure 2a:

    f        = encoder(x)                                          (N, H/4, W/4, hidden)
    z_q_top  = top_quantizer(top_pre_quant(top_encoder(f)))        (N, H/8, W/8, D)  global structure
    z_q      = quantizer(pre_quant([f, top_decoder(z_q_top)]))     (N, H/4, W/4, D)  detail, given the top
    x_hat    = decoder([upsample_top(z_q_top), z_q])

[a, b] concatenates channels. Each level has its own codebook and VQ loss (vqvae.py, eq. 3). /4
is the code stride s (cfg.code_stride; 8 halves each grid again), the top is at /2s. With
cfg.top_only_rate, training also decodes some images from z_q_top alone (class TopOnly). The
two priors over these codes, a top one with attention and a bottom one conditioned on the top
codes, are prior.py's PixelCNN; docs/vqvae2.md measures the setting that the defaults give.
"""
import numpy as np

from vqvae import (VQVAE, Conv2d, ConvTranspose2d, backend, make_decoder, make_encoder, make_quantizer, step_rng,
                   uniform_init)


def set_defaults(cfg):
    """The vqvae.Config settings whose default (None) depends on the levels: for two levels the
    setting docs/vqvae2.md measured at 64 x 64, where without it the top level collapses (0.4 % of
    its codes used): k-means initialisation and restarts (nearest-neighbour codebooks only), a
    quarter of the images decoded from the top code alone, 32 top codes; for one level, none."""
    two, nearest = cfg.levels == 2, cfg.quantizer in ("vq", "ema", "rvq")
    if cfg.kmeans_init is None:
        cfg.kmeans_init = two and nearest
    if cfg.restart_threshold is None:
        cfg.restart_threshold = 1.0 if two and nearest else 0.0
    if cfg.top_only_rate is None:
        cfg.top_only_rate = 0.25 if two else 0.0
    if cfg.top_codebook_size is None:
        cfg.top_codebook_size = 32 if two and cfg.quantizer not in ("fsq", "lfq") else 0


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


class VQVAE2(VQVAE):
    """The two-level model: VQVAE's training step, checks and checkpoints, with VQ-VAE-2's parts.
    encode(x) -> (top, bottom) codes; decode(top, bottom) -> images, decode(top) from the top alone."""

    def __init__(self, cfg, device=None):
        self.cfg, self.xp, self.downsample = cfg, backend(device), cfg.downsample
        init = uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        H, D = cfg.hidden, cfg.code_dim
        self.quantizer = q = make_quantizer(cfg, init, seed=(cfg.seed, 0))
        self.encoder = make_encoder(cfg.in_channels, cfg, init, stride=cfg.code_stride)
        self.pre_quant = Conv2d(H + D, q.in_dim, 1, init=init)        # reads [f, top_decoder(z_q_top)]
        self.top_quantizer = top = make_quantizer(cfg, init, seed=(cfg.seed, 1), K=cfg.level_num_codes[0])
        self.decoder = make_decoder(top.out_dim + q.out_dim, cfg.in_channels, cfg, init, stride=cfg.code_stride)
        self.top_encoder = make_encoder(H, cfg, init, stride=2, input_grad=True)
        self.top_pre_quant = Conv2d(H, top.in_dim, 1, init=init)
        self.top_decoder = make_decoder(top.out_dim, D, cfg, init, stride=2)  # conditions the bottom code
        self.upsample_top = ConvTranspose2d(top.out_dim, top.out_dim, 4, stride=2, padding=1, init=init)  # for the decoder
        self.parts = {"encoder": self.encoder, "pre_quant": self.pre_quant, "quantizer": self.quantizer,
                      "decoder": self.decoder, "top_encoder": self.top_encoder, "top_pre_quant": self.top_pre_quant,
                      "top_quantizer": self.top_quantizer, "top_decoder": self.top_decoder,
                      "upsample_top": self.upsample_top}
        if cfg.top_only_rate > 0:
            self.top_only = self.parts["top_only"] = TopOnly(cfg.top_only_rate, seed=(cfg.seed, 2))

    def forward(self, x, train=True):
        """Losses of eq. 3 with both levels' VQ terms; the top level's stats are prefixed 'top_'."""
        x, xp = self.check_images(x), self.xp
        f = self.encoder.forward(x)                                    # (N, H/4, W/4, hidden)
        z_e_top = self.top_pre_quant.forward(self.top_encoder.forward(f))  # (N, H/8, W/8, D)
        z_q_top, top = self.top_quantizer.forward(z_e_top, train)
        d_top = self.top_decoder.forward(z_q_top)                      # (N, H/4, W/4, D)
        z_q, vq = self.quantizer.forward(self.pre_quant.forward(xp.concatenate([f, d_top], -1)), train)
        self.keep = self.top_only.keep(len(x), z_q.dtype, xp) if train and self.cfg.top_only_rate > 0 else None
        if self.keep is not None:                                      # some images decoded from the top alone
            z_q = z_q * self.keep
        x_hat = self.decoder.forward(xp.concatenate([self.upsample_top.forward(z_q_top), z_q], -1))
        recon = ((x_hat - x) ** 2).mean()                              # |x - x_hat|^2
        self.cache = (x, x_hat)
        return {"loss": recon + vq["vq"] + top["vq"], "recon": recon, **vq, **{f"top_{k}": v for k, v in top.items()}}

    def backward(self, dx_hat=None):
        d_in = self.decoder.backward(self.recon_grad() if dx_hat is None else dx_hat)
        D, H = self.top_quantizer.out_dim, self.cfg.hidden
        d_up, dz_q = d_in[..., :D], d_in[..., D:]                      # x_hat = decoder([upsample_top(z_q_top), z_q])
        if self.keep is not None:                                      # a zeroed bottom code gets no gradient
            dz_q = dz_q * self.keep
        d_pre = self.pre_quant.backward(self.quantizer.backward(dz_q))  # straight-through + commitment
        df, d_top = d_pre[..., :H], d_pre[..., H:]                     # z_e = pre_quant([f, top_decoder(z_q_top)])
        dz_q_top = self.upsample_top.backward(d_up) + self.top_decoder.backward(d_top)  # z_q_top feeds both
        dz_e_top = self.top_quantizer.backward(dz_q_top)               # straight-through + commitment, top level
        df = df + self.top_encoder.backward(self.top_pre_quant.backward(dz_e_top))  # f feeds both levels
        self.encoder.backward(df)

    def encode(self, x):
        """Images (N, H, W, C) -> (top codes (N, H/2s, W/2s), bottom codes (N, H/s, W/s)), s the code stride."""
        f = self.encoder.forward(self.check_images(x))
        top = self.top_quantizer.quantize(self.top_pre_quant.forward(self.top_encoder.forward(f)))
        d_top = self.top_decoder.forward(self.top_quantizer.lookup(top))
        return top, self.quantizer.quantize(self.pre_quant.forward(self.xp.concatenate([f, d_top], -1)))

    def decode(self, codes, bottom=None):
        """decode(top, bottom) with top (N, h, w) and bottom (N, 2h, 2w) -> images (N, 2s h, 2s w, C).
        With bottom=None the decoder gets zeros in place of the bottom code vectors, which shows what
        the top level carries by itself (trained for with top_only_rate, class TopOnly)."""
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
        return self.decode(*self.encode(x))
