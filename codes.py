"""Images to codes and back, for whole datasets: the VQ-VAE as a tokenizer, the priors as a source
of new codes, the two stages of the recipe joined.

    encode_all(model, images)        uint8 images -> a code grid per level, on the host
    prior_training_set(...)          the grids the priors train on (the mirrored images' too)
    sample_images(model, priors, N)  codes drawn from the priors, coarsest level first -> uint8 images
    reconstruct_images(model, images)  uint8 images -> their uint8 reconstructions
"""
import time

import numpy as np

import prior as P
import quantizers
import vqvae
from datasets import pad_to_multiple, to_model, to_uint8


def level_names(model):
    """Prefixes of each level's stats and files, coarsest first: [''] or ['top_', '']."""
    return ["top_", ""] if model.cfg.levels == 2 else [""]


def encode_all(model, images, batch_size=256):
    """uint8 images -> a tuple of integer code grids on the host, one per level, coarsest first."""
    parts = []
    for i in range(0, len(images), batch_size):
        codes = model.encode(to_model(images[i:i + batch_size]))
        parts.append(codes if isinstance(codes, tuple) else (codes,))
    return tuple(np.concatenate([vqvae.to_numpy(p[level]) for p in parts]) for level in range(len(parts[0])))


def prior_grid(codes):
    """A level's codes as the grid its prior models: residual codes (N, S, h, w) become
    (N, h, w S), a position's S codes side by side (ResidualVQ.to_grid)."""
    return quantizers.ResidualVQ.to_grid(codes) if codes.ndim == 4 else codes


def prior_training_set(model, images, labels, mirror):
    """The priors' training grids, one array per level, coarsest first, and their labels (or
    None). With mirror, also the codes of the images mirrored left to right, with the same
    labels: twice the grids, for data whose classes a mirror keeps. They are encoded, not the
    grids mirrored: the encoder's padding is not symmetric, and a mirrored image's codes differ
    from its codes mirrored (for the default model, at 16 % of the positions)."""
    codes = tuple(map(prior_grid, encode_all(model, images)))
    if mirror:
        mirrored = tuple(map(prior_grid, encode_all(model, images[:, :, ::-1])))  # (N, H, W, C): W reversed
        codes = tuple(np.concatenate([a, b]) for a, b in zip(codes, mirrored))
        labels = None if labels is None else np.concatenate([labels, labels])
    return codes, labels


def sample_images(model, priors, N, seed, rule, real_hw, labels=None, batch_size=256):
    """N new images: codes sampled from the priors, coarsest level first, each finer level given
    the one above (and the class labels (N,) when the priors are class-conditional), then
    decoded -> (uint8 images, codes per level, seconds spent sampling the codes). rule: the
    sampling's temperature, top_k and top_p (prior.pick) and guidance (prior.guide)."""
    h, w = real_hw
    grid_h, grid_w = -(-h // model.downsample), -(-w // model.downsample)  # the coarsest grid of a padded image
    S = model.cfg.codes_per_position                                   # residual VQ: S codes side by side
    codes = []
    t = time.time()
    for level, prior in enumerate(priors):
        f = 2 ** level
        cond = codes[-1] if codes else None
        codes.append(vqvae.to_numpy(P.sample(prior, N, grid_h * f, grid_w * f * S, seed + level, labels=labels,
                                             cond_codes=cond, **rule)))
    seconds = time.time() - t
    if S > 1:
        codes = [quantizers.ResidualVQ.from_grid(c, S) for c in codes]  # (N, h, w S) -> (N, S, h, w)
    images = np.concatenate([to_uint8(model.decode(*(c[i:i + batch_size] for c in codes)))[:, :h, :w]
                             for i in range(0, N, batch_size)])
    return images, codes, seconds


def reconstruct_images(model, images, batch_size=256):
    """uint8 images -> uint8 reconstructions of the same size (padded for the model, cropped back)."""
    h, w = images.shape[1:3]
    return np.concatenate([to_uint8(model.reconstruct(to_model(pad_to_multiple(images[i:i + batch_size],
                                                                                 model.downsample))))[:, :h, :w]
                           for i in range(0, len(images), batch_size)])
