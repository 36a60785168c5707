"""PyTorch modules with the architecture, parameter names and weight layouts of this project's
models, so that a file from `python train.py export` loads into them with strict=True and they
compute what ours compute (test_export.py: the same codes; images and logits to float32 rounding).

    import torch, export, torch_modules
    tensors, meta = export.read_safetensors("model.safetensors")  # or safetensors.torch.load_file + metadata
    net = torch_modules.from_metadata(meta)                       # built from the configs the file carries
    net.load_state_dict({k: torch.from_numpy(a) for k, a in tensors.items()}, strict=True)
    x_hat = net.vqvae.decode(net.vqvae.encode(x))                 # x (N, C, H, W), (pixels / 255 - 0.5) / 0.25

(torch_modules.load(path) is those three lines.) The tree, by the names of the file's tensors;
activations are NCHW, as PyTorch has them; ours are NHWC, with the same weights:

    Exported
      vqvae: VQVAE (one level) or VQVAE2 (two)
        encoder        Sequential: Conv2d 4x4 /2, ReLU, [Conv2d 4x4 /2, ReLU], Conv2d 3x3, Residual..., ReLU
        pre_quant      Conv2d 1x1, hidden -> D
        quantizer      Quantizer: codebook (K, D); 'ema' also ema_count (K,), ema_sum (K, D)
        decoder        Sequential: Conv2d 3x3, Residual..., ReLU, [ConvTranspose2d 4x4 x2, ReLU], ConvTranspose2d
        VQVAE2 adds top_encoder, top_pre_quant, top_quantizer, top_decoder, upsample_top (vqvae2.py)
      prior            PixelCNN: embed, layers.<l> (Gated: conv_v, conv_h, link, out, [class_v, class_h],
                       [cond_v, cond_h]), attention.<l> (query, key, value, out), head (1 and 3),
                       [cond_embed, cond_stack] (VQ-VAE-2's bottom prior, given the top codes)
      top_prior        two levels: the prior of the top codes (prior: of the bottom codes, given them)

A Residual's children are numbered as ours (1: its 3x3 convolution, 3: its 1x1), an Embedding's
table is its weight. Quantizers other than vq and ema (rvq, fsq, lfq, gumbel) are not mirrored.
PyTorch is imported at the top: this file is for those who have it (and for the tests and
bench.py, behind a check); the project itself runs on NumPy alone.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import export
import prior as P
import vqvae

# -----------------------------------------------------------------------------
# the VQ-VAE (vqvae.py, vqvae2.py)


class Residual(nn.Sequential):
    """x + conv1x1(relu(conv3x3(relu(x)))): vqvae.ResidualBlock."""

    def __init__(self, ch, hidden):
        super().__init__(nn.ReLU(), nn.Conv2d(ch, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, ch, 1))

    def forward(self, x):
        return x + super().forward(x)


def make_encoder(in_ch, cfg, stride):
    """vqvae.make_encoder: (N, in_ch, H, W) -> (N, hidden, H/stride, W/stride)."""
    H = cfg.hidden
    layers, ch = [nn.Conv2d(in_ch, H // 2, 4, stride=2, padding=1), nn.ReLU()], H // 2  # /2
    for _ in range(int(math.log2(stride)) - 1):                        # /4, /8, ...
        layers += [nn.Conv2d(ch, H, 4, stride=2, padding=1), nn.ReLU()]
        ch = H
    layers += [nn.Conv2d(ch, H, 3, padding=1), *[Residual(H, cfg.res_hidden) for _ in range(cfg.res_blocks)], nn.ReLU()]
    return nn.Sequential(*layers)


def make_decoder(in_ch, out_ch, cfg, stride):
    """vqvae.make_decoder: (N, in_ch, h, w) -> (N, out_ch, stride h, stride w)."""
    H, halvings = cfg.hidden, int(math.log2(stride))
    layers = [nn.Conv2d(in_ch, H, 3, padding=1), *[Residual(H, cfg.res_hidden) for _ in range(cfg.res_blocks)],
              nn.ReLU()]
    ch = H
    for i in range(halvings - 1):                                      # x2, x4, ...: H channels, H/2 before the last
        out = H // 2 if i == halvings - 2 else H
        layers += [nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
        ch = out
    return nn.Sequential(*layers, nn.ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1))


class Quantizer(nn.Module):
    """The nearest of K codebook rows: vqvae.VectorQuantizer ('vq', the codebook a parameter) or
    VectorQuantizerEMA ('ema', the codebook a buffer, with its moving averages N_k = ema_count and
    m_k = ema_sum beside it). A 'vq' codebook with restarts also keeps their usage buffer."""

    def __init__(self, cfg, K):
        super().__init__()
        if cfg.quantizer not in ("vq", "ema"):
            raise NotImplementedError(f"torch_modules mirrors the quantizers vq and ema, not {cfg.quantizer}")
        bound = math.sqrt(3 / cfg.code_dim)                            # ours: sonnet's VarianceScaling(uniform)
        codebook = torch.empty(K, cfg.code_dim).uniform_(-bound, bound)
        if cfg.quantizer == "vq":
            self.codebook = nn.Parameter(codebook)
            if cfg.restart_threshold > 0:
                self.register_buffer("usage", torch.full((K,), float(cfg.restart_threshold)))
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(K))             # N_k = 1, m_k = e_k: e_k = m_k / N_k
            self.register_buffer("ema_sum", codebook.clone())

    def quantize(self, z_e):
        """(N, D, h, w) -> codes (N, h, w): argmin_k |z - e_k|^2 = argmin_k |e_k|^2 - 2 z.e_k, as ours."""
        N, D, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, D)                     # (M, D)
        dist = z @ (-2 * self.codebook.t()) + (self.codebook * self.codebook).sum(1)  # (M, K)
        return dist.argmin(1).reshape(N, h, w)

    def lookup(self, codes):
        """Codes (N, h, w) -> z_q (N, D, h, w)."""
        return self.codebook[codes].permute(0, 3, 1, 2)


class VQVAE(nn.Module):
    """vqvae.VQVAE: encode(x (N, C, H, W)) -> codes (N, H/s, W/s); decode(codes) -> (N, C, H, W)."""

    def __init__(self, cfg):
        super().__init__()
        D, s = cfg.code_dim, cfg.code_stride
        self.encoder = make_encoder(cfg.in_channels, cfg, s)
        self.pre_quant = nn.Conv2d(cfg.hidden, D, 1)
        self.quantizer = Quantizer(cfg, cfg.codebook_size)
        self.decoder = make_decoder(D, cfg.in_channels, cfg, s)

    def encode(self, x):
        return self.quantizer.quantize(self.pre_quant(self.encoder(x)))

    def decode(self, codes):
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, x):
        """The reconstruction of x through its codes."""
        return self.decode(self.encode(x))


class VQVAE2(nn.Module):
    """vqvae2.VQVAE2: encode(x) -> (top (N, H/2s, W/2s), bottom (N, H/s, W/s)); decode(top, bottom),
    or decode(top) from the top codes alone (zeros in place of the bottom code vectors)."""

    def __init__(self, cfg):
        super().__init__()
        H, D, s, C = cfg.hidden, cfg.code_dim, cfg.code_stride, cfg.in_channels
        K_top, K = cfg.level_num_codes
        self.encoder = make_encoder(C, cfg, s)
        self.pre_quant = nn.Conv2d(H + D, D, 1)                        # reads [f, top_decoder(z_q_top)]
        self.quantizer = Quantizer(cfg, K)
        self.decoder = make_decoder(2 * D, C, cfg, s)                  # reads [upsample_top(z_q_top), z_q]
        self.top_encoder = make_encoder(H, cfg, 2)
        self.top_pre_quant = nn.Conv2d(H, D, 1)
        self.top_quantizer = Quantizer(cfg, K_top)
        self.top_decoder = make_decoder(D, D, cfg, 2)
        self.upsample_top = nn.ConvTranspose2d(D, D, 4, stride=2, padding=1)

    def encode(self, x):
        f = self.encoder(x)                                            # (N, hidden, H/s, W/s)
        top = self.top_quantizer.quantize(self.top_pre_quant(self.top_encoder(f)))
        d_top = self.top_decoder(self.top_quantizer.lookup(top))       # (N, D, H/s, W/s)
        return top, self.quantizer.quantize(self.pre_quant(torch.cat([f, d_top], 1)))

    def decode(self, top, bottom=None):
        z_q_top = self.top_quantizer.lookup(top)                       # (N, D, h, w)
        N, D, h, w = z_q_top.shape
        z_q = z_q_top.new_zeros(N, D, 2 * h, 2 * w) if bottom is None else self.quantizer.lookup(bottom)
        return self.decoder(torch.cat([self.upsample_top(z_q_top), z_q], 1))

    def forward(self, x):
        return self.decode(*self.encode(x))


# -----------------------------------------------------------------------------
# the PixelCNN prior (prior.py)


def gate(a):
    """tanh(a_f) * sigmoid(a_g) of the two channel halves (paper eq. 2)."""
    a_f, a_g = a.chunk(2, dim=1)
    return torch.tanh(a_f) * torch.sigmoid(a_g)


class Gated(nn.Module):
    """prior.GatedLayer. Ours pads inside its convolutions; here F.pad pads, asymmetrically,
    with the zeros ours pads with or shifts in: F.pad(x, (left, right, top, bottom))."""

    def __init__(self, cfg, first, rows, dilation=1):
        super().__init__()
        p, k, self.r, self.first, self.d = cfg.channels, cfg.kernel, cfg.kernel // 2, first, dilation
        self.conv_v = nn.Conv2d(p, 2 * p, (self.r + 1, k), dilation=(dilation, 1))  # rows i-r d..i, d apart
        self.conv_h = nn.Conv2d(p, 2 * p, (1, self.r + 1))             # row i, columns j-r..j
        self.link = nn.Conv2d(2 * p, 2 * p, 1)                         # vertical -> horizontal
        self.out = nn.Conv2d(p, p, 1)
        self.drop = nn.Dropout(cfg.dropout)                            # its own masks in training, not ours
        if rows:                                                       # a bias per class (and "no class")
            self.class_v, self.class_h = nn.Embedding(rows, 2 * p), nn.Embedding(rows, 2 * p)
        if cfg.cond_channels:                                          # a conditioning map, by 1x1 convolutions
            self.cond_v = nn.Conv2d(cfg.cond_channels, 2 * p, 1)
            self.cond_h = nn.Conv2d(cfg.cond_channels, 2 * p, 1)

    def forward(self, v, h, labels=None, cond=None):
        r = self.r
        c_v = c_h = 0.0                                                # conditioning, summed as ours sums it
        if labels is not None:
            c_v = c_v + self.class_v(labels)[:, :, None, None]         # (N, 2p, 1, 1)
            c_h = c_h + self.class_h(labels)[:, :, None, None]
        if cond is not None:
            c_v = c_v + self.cond_v(cond)                              # (N, 2p, h, w)
            c_h = c_h + self.cond_h(cond)
        v_pre = self.conv_v(F.pad(v, (r, r, r * self.d, 0))) + c_v     # rows <= i
        link = self.link(F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1])        # down one row: rows <= i-1 only
        h_in = F.pad(h, (1, 0))[..., :-1] if self.first else h         # mask A: right one column
        h_pre = self.conv_h(F.pad(h_in, (r, 0))) + link + c_h
        h_out = self.out(self.drop(gate(h_pre)))
        return gate(v_pre), (h_out if self.first else h_out + h)       # no residual in layer 1


class Attention(nn.Module):
    """prior.CausalSelfAttention: each position reads every position up to itself in raster order."""

    def __init__(self, C, d, n, frequencies=5):
        super().__init__()
        self.n, self.F, self.scale = n, frequencies, 1 / math.sqrt(d // n)
        pos_ch = 4 * frequencies                                       # channels of the positional code
        self.query, self.key = nn.Conv2d(C + pos_ch, d, 1), nn.Conv2d(C + pos_ch, d, 1)
        self.value, self.out = nn.Conv2d(C, d, 1), nn.Conv2d(d, C, 1)

    def forward(self, h):
        N, C, H, W = h.shape
        pos = torch.from_numpy(P.positional_encoding(H, W, self.F, np, "float64")).to(h).permute(2, 0, 1)
        x = torch.cat([h, pos.expand(N, -1, -1, -1)], dim=1)           # (N, C + P, H, W)

        def heads(y):                                                  # (N, d, H, W) -> (N, n, T, d/n), as split_heads
            return y.reshape(N, self.n, -1, H * W).transpose(2, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(h))
        later = torch.ones(H * W, H * W, dtype=torch.bool, device=h.device).triu(1)  # key after query
        a = torch.softmax((q @ k.transpose(2, 3) * self.scale).masked_fill(later, -math.inf), dim=-1)
        o = (a @ v).transpose(2, 3).reshape(N, -1, H, W)               # heads merged: (N, d, H, W)
        return h + self.out(o)


class PixelCNN(nn.Module):
    """prior.PixelCNN: forward(codes (N, h, w), labels (N,) or None, cond (N, Cc, h, w) or None,
    cond_codes (N, h/f, w/f) or None) -> logits (N, K, h, w), as F.cross_entropy takes them."""

    def __init__(self, cfg):
        super().__init__()
        p, every, self.f = cfg.channels, cfg.attention_every, cfg.cond_upsample
        rows = cfg.num_classes + (cfg.label_dropout > 0)               # + the "no class" label, for guidance
        self.embed = nn.Embedding(cfg.codebook_size, p)
        self.layers = nn.ModuleList(Gated(cfg, l == 0, rows, cfg.dilation ** l) for l in range(cfg.layers))
        self.attention = nn.ModuleDict({str(l): Attention(p, cfg.attention_dim or p, cfg.heads)  # after gated layer l
                                        for l in range(cfg.layers) if every and (l + 1) % every == 0})
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(p, p, 1), nn.ReLU(), nn.Conv2d(p, cfg.codebook_size, 1))
        if cfg.cond_codebook_size:                                     # VQ-VAE-2's conditioning stack
            self.cond_embed = nn.Embedding(cfg.cond_codebook_size, cfg.cond_channels)
            self.cond_stack = nn.Sequential(*(Residual(cfg.cond_channels, cfg.cond_channels)
                                              for _ in range(cfg.cond_blocks)))

    def forward(self, codes, labels=None, cond=None, cond_codes=None):
        if cond_codes is not None:                                     # the top codes -> the map every gate reads
            c = self.cond_stack(self.cond_embed(cond_codes).permute(0, 3, 1, 2))  # (N, Cc, h/f, w/f)
            cond = c.repeat_interleave(self.f, dim=2).repeat_interleave(self.f, dim=3)
        v = h = self.embed(codes).permute(0, 3, 1, 2).contiguous()    # (N, p, h, w), NCHW in memory too
        for l, layer in enumerate(self.layers):
            v, h = layer(v, h, labels, cond)
            if str(l) in self.attention:
                h = self.attention[str(l)](h)                          # after gated layer l, as ours
        return self.head(h)                                            # (N, K, h, w)


# -----------------------------------------------------------------------------
# building the tree: from an export's metadata, or from one of our models


class Exported(nn.Module):
    """The tree of an export: vqvae, and the priors it holds (prior; two levels: top_prior, prior)."""

    def __init__(self, model_cfg, prior_cfgs=()):
        super().__init__()
        self.vqvae = module_for(model_cfg)
        names = ["top_prior", "prior"] if model_cfg.levels == 2 else ["prior"]
        for name, cfg in zip(names, prior_cfgs):
            setattr(self, name, module_for(cfg))


def module_for(cfg):
    """The module a config describes (a vqvae.Config or a prior.PriorConfig), in its dtype."""
    if isinstance(cfg, P.PriorConfig):
        net = PixelCNN(cfg)
    else:
        net = VQVAE2(cfg) if cfg.levels == 2 else VQVAE(cfg)
    return net.to(getattr(torch, cfg.dtype))


def from_metadata(meta):
    """The (untrained) tree of the export whose __metadata__ is `meta`: its configs are JSON strings."""
    model_cfg, prior_cfgs, _ = export.read_configs(meta, "the export's metadata")
    return Exported(model_cfg, prior_cfgs)


def load(path):
    """An export, read by export.read_safetensors and loaded with strict=True, in evaluation mode."""
    tensors, meta = export.read_safetensors(path)
    net = from_metadata(meta)
    net.load_state_dict({k: torch.from_numpy(a) for k, a in tensors.items()}, strict=True)
    return net.eval()


def mirror(ours):
    """The module of one of our models (vqvae.VQVAE, vqvae2.VQVAE2, prior.PixelCNN) with its
    weights, by the export's names (bench.py times it beside ours; the tests compare the two)."""
    net = module_for(ours.cfg)
    net.load_state_dict({k: torch.from_numpy(np.array(vqvae.to_numpy(a))) for k, a in export.exported(ours).items()},
                        strict=True)
    return net
