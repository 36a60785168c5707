"""VQGAN's losses on top of the VQ-VAE, with hand-written backward passes: an adversarial patch
loss, and an L1 and a perceptual term beside the squared error.

Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021,
https://arxiv.org/abs/2012.09841, sec. 3.1. A decoder trained on the squared error alone puts
the mean of what it cannot tell apart, and blurs. A patch discriminator D learns to tell real
images from reconstructions; the VQ-VAE gets a second loss, which blur does not satisfy:

    L_D    = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(sg[x_hat])))    hinge loss: moves D only
    L_GAN  = -mean D(x_hat)                                              moves the VQ-VAE only
    L_rec  = |x - x_hat|^2 + a |x - x_hat|_1 + b P(x, x_hat)             VQGAN's: L1 and LPIPS
    L      = L_rec + vq (vqvae.py, eq. 3) + lambda L_GAN                 paper eq. 6
    lambda = w |grad_{G_L} L_rec| / (|grad_{G_L} L_GAN| + delta)         paper eq. 7, a constant sg[.]
    w_t+1  = min(w, w_t exp(r (L_D* - L_D,t))), w_0 = w                 w held back (optional)

The last line is this project's, not VQGAN's: eq. 7 balances the two gradients, not the two
players. Where D is still at chance (L_D = 1) L_GAN's gradient is small and lambda large, so
the VQ-VAE fools D after every step and D never gets ahead (docs/decoder.md: the digits). So w
is lowered, multiplicatively, while D's hinge loss is above L_D* (nearer chance than a D that
has learned something), and let back up to w, never above it, once D is ahead: a proportional
controller, as BEGAN's k_t keeps its two losses in a ratio and StyleGAN2-ADA's augmentation
keeps D's overfitting at a target. Raised above w as well, it pushed the scenes' decoder ever
harder while D stayed ahead, and one seed's squared error doubled (docs/decoder.md).

P is a perceptual distance: LPIPS compares an ImageNet network's features, which cannot be
downloaded here, so P compares the features of a network trained on the run's own training
images (perceptual_loss; train.py trains it on a task of its own, never the judge that
measures the result). G_L is the decoder's last layer. VQGAN's code (taming-transformers,
calculate_adaptive_weight) asks autograd twice for a gradient at G_L's weight,
torch.autograd.grad(loss, last_layer, retain_graph=True), once per loss. Here the two gradients
at x_hat are at hand (L_rec's from its terms, L_GAN's back through D), and G_L's weight gradient
is linear in its upstream gradient: two calls of weight_grad, then ONE decoder backward with
dx_hat = d L_rec + lambda d L_GAN. Below: LeakyReLU, PatchDiscriminator, the losses, and the step.
"""
import math

from vqvae import Conv2d, NonFiniteError, ReLU, Sequential, array_module, conv_weight, pad_hw, windows


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


def l1_loss(x, x_hat):
    """mean |x_hat - x| -> (loss, d loss / d x_hat): sign(x_hat - x) / n, 0 where they are equal."""
    diff = x_hat - x
    return array_module(diff).abs(diff).mean(), array_module(diff).sign(diff) / diff.size


def perceptual_loss(net, x, x_hat):
    """P = sum_l mean((phi_l(x_hat) - phi_l(x))^2) / mean(phi_l(x)^2) -> (P, dP / dx_hat), phi_l
    the output of the l-th ReLU of the Sequential `net` (fixed: its parameters are not trained
    here, and its first layer must keep its input gradient). Each layer's term is divided by the
    real images' mean square there, a constant, so that every layer weighs alike; the layers
    after the last ReLU (a pooling) are left out. net's caches hold x_hat's pass, for backward."""
    layers = net.layers[:max(i for i, layer in enumerate(net.layers) if isinstance(layer, ReLU)) + 1]
    feats = []
    for images in (x, x_hat):                                          # the real images first: constants
        h, taps = images, {}
        for i, layer in enumerate(layers):
            h = layer.forward(h)
            if isinstance(layer, ReLU):
                taps[i] = h
        feats.append(taps)
    real, fake = feats
    loss, d = 0.0, None
    for i in reversed(range(len(layers))):                             # back through the layers, each tap adding
        if i in real:                                                  # its term's gradient on the way
            scale = (real[i] ** 2).mean() + 1e-8                       # sg[]: a constant
            diff = fake[i] - real[i]
            loss = loss + (diff ** 2).mean() / scale
            g = 2 * diff / (diff.size * scale)
            d = g if d is None else d + g
        d = layers[i].backward(d)
    return loss, d


def weight_grad(layer, dy):
    """The gradient at a ConvTranspose2d's weights of a loss whose gradient at the layer's output is
    dy, from the input its latest forward cached; its .grads are left as they are. dW is linear in
    dy (dW = patches(dy)^T x, as in its backward), so each loss's gradient at G_L costs one matmul."""
    x = layer.cache
    N, H, W, Ci = x.shape
    dy_pad = pad_hw(dy, layer.padding)                                 # (N, Hp, Wp, Co)
    dcols = windows(dy_pad, layer.kh, layer.kw, layer.stride).reshape(N * H * W, -1)  # (M, kh*kw*Co)
    return conv_weight(dcols.T @ x.reshape(-1, Ci), layer.kh, layer.kw)  # (Ci, Co, kh, kw)


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
    """A VQ-VAE trained with VQGAN's losses beside eq. 3 (the module's docstring gives the
    formulas): `l1` is a and `perceptual` b of L_rec, `net` the network P is measured in; with a
    discriminator, `weight` is w of eq. 7 (taming's discriminator_weight) and before step `start`
    the discriminator is neither trained nor used (taming's disc_factor 0), so that it meets
    reconstructions that already look like the images. With a `target` L_D* each adversarial step
    moves w by exp(rate (L_D* - L_D)), within [w / bound, w]; without, w stays VQGAN's."""

    def __init__(self, model, disc=None, weight=0.8, start=0, l1=0.0, perceptual=0.0, net=None,
                 target=None, rate=0.01, bound=100.0):
        self.model, self.disc, self.weight, self.start = model, disc, float(weight), int(start)
        self.l1, self.perceptual, self.net = float(l1), float(perceptual), net
        self.target, self.rate, self.bound = target, float(rate), float(bound)
        self.scale = 1.0                                               # w_t / w, kept in the checkpoint

    def steer(self, disc_loss):
        """w_t+1 = min(w, w_t exp(r (L_D* - L_D,t))): down while D's loss is above the target
        (nearer chance), back up toward w while below; scale = w_t / w is a Python float, so that
        a checkpoint can hold it (on a GPU one scalar to the host a step, after the two Adams'
        finiteness checks have waited for the device already)."""
        if self.target is not None:
            moved = float(self.scale) * math.exp(self.rate * (self.target - float(disc_loss)))
            self.scale = min(max(moved, 1 / self.bound), 1.0)

    def reconstruction(self, stats):
        """L_rec's terms beyond the squared error, added to stats -> d L_rec / d x_hat."""
        x, x_hat = self.model.cache                                    # (N, H, W, C) each
        dx_rec = self.model.recon_grad()                               # d |x - x_hat|^2 / d x_hat
        if self.l1:
            stats["l1"], dx = l1_loss(x, x_hat)
            stats["loss"] = stats["loss"] + self.l1 * stats["l1"]
            dx_rec = dx_rec + self.l1 * dx
        if self.perceptual:
            stats["perceptual"], dx = perceptual_loss(self.net, x, x_hat)
            stats["loss"] = stats["loss"] + self.perceptual * stats["perceptual"]
            dx_rec = dx_rec + self.perceptual * dx
        return dx_rec

    def forward(self, x, train=True, adversarial=True):
        """The losses; with adversarial=False (or no discriminator) those of L_rec and the VQ terms
        alone. The adaptive weight needs L_GAN's gradient at G_L, so the generator's pass through
        D runs forward and back here."""
        stats = self.model.forward(x, train)                           # recon + vq, eq. 3
        dx_rec = self.reconstruction(stats)
        self.adversarial = adversarial and self.disc is not None
        if not self.adversarial:
            self.cache = (dx_rec, None)
            return stats
        xp = self.model.xp
        x, x_hat = self.model.cache                                    # (N, H, W, C) each
        # the generator's term, through D as it is before this step
        gan, dlogits_fake = generator_loss(self.disc.forward(x_hat))   # L_GAN = -mean D(x_hat)
        dx_gan = self.disc.backward(dlogits_fake)                      # dL_GAN/dx_hat; the D gradients this pass
                                                                       # leaves in disc.grads are overwritten below
        G_L = self.model.decoder.layers[-1]                           # the last layer, whose output is x_hat
        lam = self.weight * self.scale * adaptive_weight(weight_grad(G_L, dx_rec),  # eq. 7, sg[]: a constant;
                                                         weight_grad(G_L, dx_gan))  # w_t = weight * scale
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
        dx_hat, dlogits = self.cache
        self.model.backward(dx_hat)                                    # eq. 6: d L_rec + lambda d L_GAN, one pass
        if self.adversarial:
            self.disc.backward(dlogits)                                # L_D: D only (x_hat was data to it)

    def train_step(self, x, opt, disc_opt=None, step=0):
        """One step of both Adams at training step `step` (from 0). Both networks' gradients come
        from one forward (taming-transformers runs a second one for D's step, after the VQ-VAE's
        update: there D learns from reconstructions one step newer). Every gradient is checked
        before either optimiser changes anything: a step that is not finite raises NonFiniteError
        and leaves the VQ-VAE (EMA state included), D and both Adams as they were."""
        adversarial = self.disc is not None and step >= self.start
        with self.model.kept_unless_finite():
            stats = self.forward(x, train=True, adversarial=adversarial)
            self.backward()
            if adversarial:
                check_finite_grads(self.disc.grads)                    # before opt.step, which checks the VQ-VAE's
            opt.step(self.model.grads, self.model.params)
            if adversarial:
                disc_opt.step(self.disc.grads, self.disc.params)
        if adversarial:
            self.steer(stats["disc_loss"])                             # after a step that was taken
        return stats
