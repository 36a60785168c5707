"""Measuring what the two stages make, on held-out data.

    evaluate(model, images)    the VQ-VAE: held-out MSE and PSNR, each level's code usage
    evaluate_prior(prior, ...) a prior: held-out bits per code
    evaluate_samples(...)      `train.py evaluate`: a judge network trained on the real training
                               images measures held-out images, their reconstructions and samples

Bits per code cannot tell a good sample from a bad one, so samples are measured the way FID does,
in the features of a network trained on the real data: Frechet distance, precision and recall,
and the judge's accuracy on the class each sample was asked for. Each figure is read against its
floor (or ceiling), the same figure for two halves of the real data. docs/evaluation.md.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

import vqvae
from vqvae import array_module, one_hot
from codes import encode_all, level_names, reconstruct_images, sample_images
from datasets import batch_indices, pad_to_multiple, to_model, to_uint8
from runs import checkpoint_note, load_model, save_npz
from settings import check, from_dict, setting


# -----------------------------------------------------------------------------
# the VQ-VAE and the priors on held-out data


def evaluate(model, images, real_hw, batch_size):
    """Held-out MSE and PSNR on the real pixels (padding cropped) in [0, 1], and each level's
    code usage over the whole split (for residual VQ, the stages' mean). For two levels also
    the MSE of the reconstructions from the top codes alone (the bottom code vectors zeroed):
    how much of each image the coarse code carries by itself."""
    S = model.cfg.codes_per_position
    h, w = real_hw
    sq_err, top_sq_err, n_values = 0.0, 0.0, 0
    counts = {name: np.zeros((S, K), np.int64) for name, K in zip(level_names(model), model.cfg.level_num_codes)}
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        codes = encode_all(model, batch)
        x_hat = to_uint8(model.decode(*codes))[:, :h, :w]
        diff = x_hat.astype(np.float64) / 255 - batch[:, :h, :w] / 255
        sq_err += float((diff ** 2).sum())
        n_values += diff.size
        if len(codes) == 2:                                            # decode(top): the bottom vectors zeroed
            top_only = to_uint8(model.decode(codes[0]))[:, :h, :w].astype(np.float64) / 255
            top_sq_err += float(((top_only - batch[:, :h, :w] / 255) ** 2).sum())
        for name, c in zip(counts, codes):
            c = c.reshape(len(c), S, -1).transpose(1, 0, 2).reshape(S, -1)  # (S, N h w): a row per stage
            counts[name] += np.stack([np.bincount(row, minlength=counts[name].shape[1]) for row in c])
    mse = sq_err / n_values
    result = {"val_mse": mse, "val_psnr": 10 * math.log10(1 / max(mse, 1e-12))}
    if model.cfg.levels == 2:
        result["top_only_mse"] = top_sq_err / n_values
    for name, c in counts.items():
        p = c / c.sum(1, keepdims=True)                                # (S, K)
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)          # (S,) nats
        result[f"{name}perplexity"] = float(np.exp(entropy).mean())
        result[f"{name}codes_used"] = float((c > 0).mean())
    return result


def evaluate_prior(prior, codes, labels, cond_codes, batch_size, name):
    """Held-out negative log-likelihood of the codes, in bits per code, over the whole split."""
    total = 0.0
    for i in range(0, len(codes), batch_size):
        part = slice(i, i + batch_size)
        stats = prior.loss(codes[part], None if labels is None else labels[part],
                           cond_codes=None if cond_codes is None else cond_codes[part])
        total += float(stats["bits_per_code"]) * len(codes[part])
    return {f"{name}_val_bits_per_code": total / len(codes)}


# -----------------------------------------------------------------------------
# the judge: a small classifier trained on the real training images, in whose features the
# samples and reconstructions are measured; built from vqvae.py's layers and two of its own


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


@dataclass
class JudgeConfig:
    in_channels: int = setting(3, low=1)       # C of the images
    num_classes: int = setting(3, low=2)       # the data's classes; without labels, the rotations it tells apart
    width: int = setting(16, low=1)            # w: channels of the first layer (then 2w, 2w, 4w)
    rotations: bool = setting(False)           # True: trained to tell by how much an image was rotated (no labels)
    sharpness: bool = setting(False, absent=False)  # also trained to tell images from their blurred copies
    dtype: str = setting("float32", choices=("float32", "float64"))
    seed: int = setting(0, low=0)              # initialisation and the order of its training batches

    def __post_init__(self):
        check(self)

    @classmethod
    def from_dict(cls, d):
        return from_dict(cls, d)


class Judge:
    """x (N, H, W, C) -> logits (N, K): a 3x3 conv, two 4x4 convs of stride 2, a 3x3 conv, with
    a ReLU after each, then the mean over positions and a linear layer (a 1x1 conv). The mean
    vector, 4w numbers, is an image's feature, as FID uses Inception's pool features.

    A classifier learns what its classes need and no more: blur keeps a triangle a triangle, so
    a judge trained on the classes alone hardly sees it (reconstructions at its floor from the
    real images). With cfg.sharpness a second linear layer on the same feature learns to tell
    real images from blurred copies of them, so that the feature sees edges; the class layer
    still learns from the real images only (docs/evaluation.md)."""

    def __init__(self, cfg, device=None):
        self.cfg, self.xp = cfg, vqvae.backend(device)
        init = vqvae.uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        w = cfg.width
        self.features = vqvae.Sequential(
            vqvae.Conv2d(cfg.in_channels, w, 3, padding=1, init=init, input_grad=False), vqvae.ReLU(),
            vqvae.Conv2d(w, 2 * w, 4, stride=2, padding=1, init=init), vqvae.ReLU(),        # H/2
            vqvae.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1, init=init), vqvae.ReLU(),    # H/4
            vqvae.Conv2d(2 * w, 4 * w, 3, padding=1, init=init), vqvae.ReLU(),
            MeanPool())                                                                 # (N, 1, 1, 4w)
        self.head = vqvae.Conv2d(4 * w, cfg.num_classes, 1, init=init)
        self.parts = {"features": self.features, "head": self.head}
        if cfg.sharpness:                                              # real (0) or blurred (1), drawn last
            self.sharp = self.parts["sharp"] = vqvae.Conv2d(4 * w, 2, 1, init=init)

    @property
    def params(self):
        return vqvae.gather(self.parts, "params")

    @property
    def grads(self):
        return vqvae.gather(self.parts, "grads")

    def forward(self, x):
        return self.head.forward(self.features.forward(self.xp.asarray(x, dtype=self.cfg.dtype)))[:, 0, 0]  # (N, K)

    def loss(self, x, labels, blurred=None):
        """Cross-entropy of the class (or rotation) of the images x; with `blurred` images (a
        judge with sharpness), plus the cross-entropy of telling x (0) from them (1), on the same
        features of both."""
        xp, n = self.xp, len(x)
        f = self.features.forward(xp.asarray(x if blurred is None else np.concatenate([x, blurred]), self.cfg.dtype))
        logits = self.head.forward(f[:n])[:, 0, 0]                     # (n, K): the real images' classes
        labels = xp.asarray(labels)
        loss, self.dlogits = softmax_cross_entropy(logits, labels)
        stats = {"accuracy": (logits.argmax(1) == labels).mean()}
        self.dsharp = None
        if blurred is not None:
            sharp = self.sharp.forward(f)[:, 0, 0]                     # (n + m, 2)
            blurry = xp.asarray(np.r_[np.zeros(n, np.int64), np.ones(len(blurred), np.int64)])
            loss_sharp, self.dsharp = softmax_cross_entropy(sharp, blurry)
            loss = loss + loss_sharp                                   # both tasks, one feature
            stats["sharp_accuracy"] = (sharp.argmax(1) == blurry).mean()
        return {"loss": loss, **stats}

    def backward(self):
        df = self.head.backward(self.dlogits[:, None, None, :])       # logits = head(mean(features)), real only
        if self.dsharp is not None:
            df_all = self.sharp.backward(self.dsharp[:, None, None, :])  # sharp = sharp(mean(features)), all
            df_all[:len(df)] += df
            df = df_all
        self.features.backward(df)

    def train_step(self, x, labels, opt, blurred=None):
        stats = self.loss(x, labels, blurred)
        self.backward()
        opt.step(self.grads, self.params)
        return stats

    def embed(self, images, batch_size=250):
        """uint8 images -> (features (N, 4w) in float64, the predicted class (N,)), on the host."""
        feats, preds = [], []
        for i in range(0, len(images), batch_size):
            x = to_model(pad_to_multiple(images[i:i + batch_size], 4))  # at least 4 x 4 for the two stride-2 layers
            f = self.features.forward(self.xp.asarray(x, dtype=self.cfg.dtype))
            preds.append(vqvae.to_numpy(self.head.forward(f)[:, 0, 0].argmax(1)))
            feats.append(vqvae.to_numpy(f[:, 0, 0]).astype(np.float64))
        return np.concatenate(feats), np.concatenate(preds)

    def state_dict(self):
        return {k: vqvae.to_numpy(v) for k, v in self.params.items()}

    def load_state_dict(self, state):
        vqvae.load_arrays(self.params, state, self.xp)

    @classmethod
    def load(cls, path, device=None):
        return vqvae.read_checkpoint(cls, JudgeConfig, path, device)


def blur(images, sigma):
    """uint8 images (N, H, W, C) blurred by a Gaussian of standard deviation sigma pixels (the
    border repeated), rounded back to uint8: what the judge learns to see, and the tests' ruler."""
    if sigma == 0:
        return images
    r = int(math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()                                                       # (2r + 1,) taps, one axis at a time
    x = images.astype(np.float32)
    for axis in (1, 2):
        padded = np.pad(x, [(r, r) if a == axis else (0, 0) for a in range(4)], mode="edge")
        x = sum(k[i] * np.take(padded, range(i, i + x.shape[axis]), axis) for i in range(2 * r + 1))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def rotate(images, k):
    """Each image i turned by k[i] quarter turns (k in 0..3; a non-square image takes 0 or 2)."""
    out = images.copy()
    for turns in (1, 2, 3):
        if (k == turns).any():
            out[k == turns] = np.rot90(images[k == turns], turns, axes=(1, 2))
    return out


def judge_task(data):
    """(labels of the training images, number of classes, rotations?) the judge learns. Where
    the data has no labels, telling by how much an image was turned (RotNet, Gidaris et al.
    2018) still needs its content: circles and squares look alike turned, digits do not."""
    if data.get("num_classes", 0) > 0 and "train_labels" in data:
        return data["train_labels"], data["num_classes"], False
    H, W = data["train"].shape[1:3]
    return None, 4 if H == W else 2, True


BLUR = (0.3, 1.5)  # the blur the judge learns to tell apart: sigma uniform in this range, a draw per step


def train_judge(data, seed, steps, device, batch_size=32, lr=2e-3, log=None, rotations=None, sharpness=True):
    """A judge trained on the real training split only (the held-out images are what it measures):
    a batch of images for its classes (rotations: their rotation, whatever the data), and with
    sharpness the same images blurred, a sigma a step from BLUR, for its sharpness."""
    images = pad_to_multiple(data["train"], 4)                         # at least 4 x 4 for the two stride-2 layers
    labels, K, by_data = judge_task(data)
    if rotations and not by_data:
        K = 4 if images.shape[1] == images.shape[2] else 2
    rotations = by_data if rotations is None else rotations
    judge = Judge(JudgeConfig(in_channels=images.shape[3], num_classes=K, rotations=rotations, sharpness=sharpness,
                              seed=seed), device)
    opt = vqvae.Adam(judge.params, lr=lr)
    batch_size = min(batch_size, len(images))
    for s in range(steps):
        idx = batch_indices(seed, s, len(images), batch_size)
        x = images[idx]
        rng = np.random.default_rng([seed, s])
        if rotations:                                                  # K = 4 quarter turns, or 2 half turns
            y = rng.integers(0, K, len(idx))
            x = rotate(x, y * (4 // K))
        else:
            y = labels[idx]
        stats = judge.train_step(to_model(x), y, opt, blurred=to_model(blur(x, rng.uniform(*BLUR))) if sharpness else None)
        if log and (s + 1) % 250 == 0:
            log(f"judge {s + 1}/{steps} loss {float(stats['loss']):.4g} accuracy {float(stats['accuracy']):.3f}"
                + (f" sharp {float(stats['sharp_accuracy']):.3f}" if sharpness else ""))
    return judge


def two_sample_test(A, B, seed, steps=600, crop=16, batch_size=32, lr=2e-3, device=None):
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): a fresh network of the judge's shape,
    trained to tell the first halves of the uint8 image sets A (0) and B (1) apart, and its
    accuracy on their second halves -> a number in about [0.5, 1]. 0.5: the sets cannot be told
    apart; its floor is the same test on two halves of the real images (0.5 within about
    1 / sqrt(n)). It trains on random crop x crop windows (a batch shares one), as many as a
    quarter of a 32 x 32 image's pixels: a difference of texture or edges is local, and the crops
    keep the test quick and the network from learning the training images by heart; it is
    measured on the whole images (the mean over positions takes any size)."""
    n = min(len(A), len(B))
    h = n // 2
    A, B = pad_to_multiple(A[:n], 4), pad_to_multiple(B[:n], 4)
    net = Judge(JudgeConfig(in_channels=A.shape[3], num_classes=2, seed=seed), device)
    opt = vqvae.Adam(net.params, lr=lr)
    crop_h, crop_w = min(crop, A.shape[1]), min(crop, A.shape[2])
    y = np.r_[np.zeros(batch_size, np.int64), np.ones(batch_size, np.int64)]
    for s in range(steps):
        rng = np.random.default_rng([seed, s])
        i, j = rng.integers(0, A.shape[1] - crop_h + 1), rng.integers(0, A.shape[2] - crop_w + 1)
        x = np.concatenate([A[rng.integers(0, h, batch_size)], B[rng.integers(0, h, batch_size)]])
        net.train_step(to_model(x[:, i:i + crop_h, j:j + crop_w]), y, opt)
    right = 0
    for images, label in ((A[h:], 0), (B[h:], 1)):
        for k in range(0, len(images), 250):
            right += int((vqvae.to_numpy(net.forward(to_model(images[k:k + 250])).argmax(1)) == label).sum())
    return right / (2 * (n - h))


# -----------------------------------------------------------------------------
# sample metrics: plain functions of feature sets (N, F), each with its formula and its floor


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017):

        d = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    a symmetric matrix with the same eigenvalues: two symmetric eigendecompositions, no general
    matrix square root. 0 for a set and itself, |v|^2 for a set and its copy shifted by v. Two
    samples of the same data score above 0 by an amount that shrinks as 1/N: compare a figure
    with the distance between two halves of real data of the same size (the floor)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (F, F), F = 1 too
    lam, U = np.linalg.eigh(S_a)
    root_a = (U * np.sqrt(np.clip(lam, 0, None))) @ U.T              # S_a^(1/2)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ S_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(S_a) + np.trace(S_b) - 2 * cross)


def pairwise_distances(a, b):
    """(N, F), (M, F) -> (N, M) Euclidean distances."""
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019). A set's manifold is the union
    of balls around its points, each reaching that point's k-th nearest neighbour in the set:

        precision = share of the fakes inside the real manifold   (are the samples realistic?)
        recall    = share of the reals inside the fake manifold   (do they cover the data?)

    A set against itself scores 1 and 1, against a far-away set 0 and 0; two halves of real
    data score a little below 1 (the ceiling to read a figure against)."""
    def radii(x):
        return np.sort(pairwise_distances(x, x), 1)[:, min(k, len(x) - 1)]  # column 0: the point itself

    def inside(points, centres, r):
        return float((pairwise_distances(points, centres) <= r[None]).any(1).mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def sample_figures(judge, real, recon, samples, real_labels=None, sample_labels=None, two_sample_steps=0, seed=0):
    """The evaluation's figures from uint8 image sets of the same size n: held-out real images,
    their reconstructions, and samples. Each Frechet distance compares disjoint halves (n/2
    against n/2), and so do precision and recall, so that every figure and its floor (or, for
    precision, recall and accuracy, its ceiling) come from sets of the same size. With
    two_sample_steps, the two-sample tests too: reconstructions against real images, samples
    against reconstructions, and their floor, two halves of the real images."""
    fig = {}
    if two_sample_steps:
        h = len(real) // 2
        fig["c2st_real_halves"] = two_sample_test(real[:h], real[h:2 * h], seed, two_sample_steps)
        fig["c2st_recon_real"] = two_sample_test(real, recon, seed, two_sample_steps)
        if samples is not None:
            fig["c2st_samples_recon"] = two_sample_test(recon, samples, seed, two_sample_steps)
    (f_real, p_real), (f_rec, p_rec) = judge.embed(real), judge.embed(recon)
    h = len(real) // 2
    A, B = slice(0, h), slice(h, 2 * h)
    fig.update(fd_real_halves=frechet_distance(f_real[A], f_real[B]),  # the floor of fd_recon_real
               fd_recon_real=frechet_distance(f_rec[A], f_real[B]),
               fd_recon_halves=frechet_distance(f_rec[A], f_rec[B]))   # the floor of fd_samples_recon
    fig["precision_real_halves"], fig["recall_real_halves"] = precision_recall(f_real[A], f_real[B])
    fig["precision_recon"], fig["recall_recon"] = precision_recall(f_real[A], f_rec[B])
    if samples is not None:
        f_smp, p_smp = judge.embed(samples)
        fig["fd_samples_recon"] = frechet_distance(f_smp[A], f_rec[B])
        fig["fd_samples_real"] = frechet_distance(f_smp[A], f_real[B])  # both gaps: the prior's and the decoder's
        fig["precision_samples"], fig["recall_samples"] = precision_recall(f_real[A], f_smp[B])
    if real_labels is not None and not judge.cfg.rotations:
        fig["accuracy_real"] = float((p_real == real_labels).mean())
        fig["accuracy_recon"] = float((p_rec == real_labels).mean())
        if samples is not None and sample_labels is not None:
            fig["accuracy_samples"] = float((p_smp == sample_labels).mean())  # the class each sample was asked for
    return fig


def judge_for(run, data, seed, steps, device):
    """The run's judge of this seed: loaded from RUN/judge_seed<seed>.npz, or trained on the run's
    training split and saved there (a judge of other data or steps is trained anew)."""
    path = run / f"judge_seed{seed}.npz"
    _, K, rotations = judge_task(data)
    if path.is_file():
        judge = load_model(path, Judge, device)
        if (judge.cfg.in_channels, judge.cfg.num_classes, judge.cfg.rotations, judge.cfg.sharpness) == \
                (data["train"].shape[3], K, rotations, True) and checkpoint_note(path, "steps") == str(steps):
            return judge                                               # (one from before sharpness: trained anew)
    t = time.time()
    judge = train_judge(data, seed, steps, device, log=lambda text: print(text, file=sys.stderr))
    save_npz(path, {**judge.state_dict(), "config": np.array(json.dumps(asdict(judge.cfg))), "steps": np.array(str(steps)),
                    "train_time_s": np.array(time.time() - t)})
    return judge


def perceptual_network(run, data, seed, steps, device):
    """The features of a network trained on the run's training images to tell by how many quarter
    turns an image was turned (RotNet), for vqgan's perceptual term: another task and seed than
    the judge that measures the result. Read from RUN/perceptual.npz, or trained and saved there."""
    path = run / "perceptual.npz"
    if path.is_file():
        net = load_model(path, Judge, device)
    else:
        print(f"training the network of the perceptual term ({steps} steps)", file=sys.stderr)
        net = train_judge(data, seed, steps, device, rotations=True, sharpness=False)
        save_npz(path, {**net.state_dict(), "config": np.array(json.dumps(asdict(net.cfg)))})
    net.features.layers[0].input_grad = True                           # the term's gradient reaches the image
    return net.features


def evaluate_samples(run, model, priors, data, real_hw, judge_seed, judge_steps, n, seed, rule, device,
                     two_sample_steps=0):
    """Train or load the judge, then measure n held-out images, their reconstructions and n
    samples (an equal number of each class, for a class-conditional prior) -> the figures; the
    two-sample tests' networks take the judge's seed."""
    t = time.time()
    judge = judge_for(run, data, judge_seed, judge_steps, device)
    n = min(n, len(data["test"]))
    real = data["test"][:n]
    real_labels = data["test_labels"][:n] if "test_labels" in data else None
    num_classes = priors[0].cfg.num_classes if priors else 0
    sample_labels = np.arange(n) % num_classes if num_classes else None
    samples = sample_images(model, priors, n, seed, rule, real_hw, sample_labels)[0] if priors else None
    fig = sample_figures(judge, real, reconstruct_images(model, real), samples, real_labels, sample_labels,
                         two_sample_steps, judge_seed)
    return {"judge_seed": judge_seed, "judge_steps": judge_steps, "judge_task": "rotation" if judge.cfg.rotations
            else "class", "two_sample_steps": two_sample_steps, "images": n, "sample_seed": seed, **rule, **fig,
            "evaluate_time_s": time.time() - t}


def evaluation_table(ev):
    """The figures as a small table, each beside the floor it is read against."""
    rows = []
    if "c2st_recon_real" in ev:
        rows += [("two-sample test: a classifier's accuracy (0.5: alike)", "", ""),
                 ("  samples against reconstructions", ev.get("c2st_samples_recon"), ev["c2st_real_halves"]),
                 ("  reconstructions against real images", ev["c2st_recon_real"], ev["c2st_real_halves"])]
    rows += [("Frechet distance in the judge's features", "", ""),
            ("  samples to reconstructions", ev.get("fd_samples_recon"), ev["fd_recon_halves"]),
            ("  samples to real images", ev.get("fd_samples_real"), ev["fd_real_halves"]),
            ("  reconstructions to real images", ev["fd_recon_real"], ev["fd_real_halves"]),
            ("precision against real held-out images", "", ""),
            ("  samples", ev.get("precision_samples"), ev["precision_real_halves"]),
            ("  reconstructions", ev["precision_recon"], ev["precision_real_halves"]),
            ("recall of real held-out images", "", ""),
            ("  samples", ev.get("recall_samples"), ev["recall_real_halves"]),
            ("  reconstructions", ev["recall_recon"], ev["recall_real_halves"])]
    if "accuracy_real" in ev:
        rows += [("judge's accuracy (class of the largest shape, digit, ...)", "", ""),
                 ("  class-conditional samples (class asked for)", ev.get("accuracy_samples"), ev["accuracy_real"]),
                 ("  reconstructions", ev["accuracy_recon"], ev["accuracy_real"])]
    lines = [f"{'':52} {'figure':>8} {'floor':>8}"]
    for name, value, floor in rows:
        cell = lambda v: f"{v:8.4g}" if isinstance(v, float) else f"{'-' if v is None else v:>8}"
        lines.append(f"{name:52} {cell(value)} {cell(floor)}")
    guided = f" drawn with guidance {ev['guidance']:g}" if ev.get("guidance", 1) != 1 else ""
    lines.append(f"({ev['images']} held-out images, their reconstructions and {ev['images']} samples{guided}; "
                 f"judge seed {ev['judge_seed']}, trained on the {ev['judge_task']} task; every figure compares "
                 f"disjoint halves; the floor is the same figure for two halves of the data it is read against, a "
                 f"ceiling for precision, recall and accuracy; {ev['evaluate_time_s']:.0f} s)")
    return "\n".join(lines)
