"""Train a VQ-VAE, then a PixelCNN prior over its codes, then sample: the two-stage recipe.

    python train.py                                 # built-in shapes data, about five minutes on a CPU
    python train.py --data mnist --steps 5000       # IDX files from --data-dir, downloaded if absent
    python train.py --data images.npz --quantizer vq --stage vqvae
    python train.py --resume runs/RUN               # continue a run exactly where it stopped
    python train.py encode --run runs/RUN --data mnist --out codes.npy
    python train.py sample --run runs/RUN --temperature 0.8
    python train.py evaluate --run runs/RUN --judge-seed 1   # the sample figures, with another judge

A run folder holds config.json, metrics.jsonl, checkpoint.npz (VQ-VAE, optimiser, step),
recon_<step>.png grids (originals over reconstructions), recon.png, prior.npz, samples.png,
evaluation.json with judge_seed0.npz, and summary.json.
"""
import argparse
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import signal
import struct
import sys
import tarfile
import time
import tokenize
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import prior as P
import vqvae


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 1, no traceback."""


class Interrupted(Exception):
    """Ctrl-C stopped a stage after its checkpoint was saved."""


# what reading a damaged, truncated or hostile file can raise: a bad zip (an .npz is one), bad
# gzip or zlib data, an .npy header that claims more memory than there is, or does not parse
READ_ERRORS = (ValueError, KeyError, TypeError, OSError, EOFError, zlib.error, zipfile.BadZipFile, MemoryError,
               NotImplementedError, RuntimeError, struct.error, SyntaxError, tokenize.TokenError)


def unreadable(path, problem, e):
    """The UserError for one of READ_ERRORS met reading `path`."""
    if isinstance(e, MemoryError):                                     # a header that claims too much
        return UserError(f"{path}: an array's header asks for more memory than there is ({e})")
    return UserError(f"{path}: {problem} ({type(e).__name__}: {e})")


# -----------------------------------------------------------------------------
# data: uint8 images (N, H, W, C); the model sees (x / 255 - 0.5) / PIXEL_STD


SHAPE_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [30, 30, 30], [255, 255, 255]])
BACKGROUND_COLOURS = np.array([[250, 190, 212], [220, 190, 255], [255, 250, 200], [170, 255, 195],
                               [200, 200, 200], [0, 0, 117]])


def make_shapes(n, size=32, seed=0, count=(1, 2)):
    """n RGB scenes of count[0] to count[1] filled shapes (circle, square, triangle) of random
    size and place, in ten colours, on one of six background colours. The small palette gives
    the codes something discrete to learn in minutes. Labels: the kind of the largest shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5                            # pixel centres
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        background = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
        img = np.broadcast_to(background, (size, size, 3)).copy()
        largest = 0
        for _ in range(rng.integers(count[0], count[1] + 1)):
            kind, r = rng.integers(3), rng.uniform(size / 8, size / 3.5)
            cy, cx = rng.uniform(r, size - r, 2)
            if kind == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
            elif kind == 1:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            else:                                                      # apex up, base at cy + r
                mask = (yy <= cy + r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)
            colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
            while np.abs(colour - img[mask].mean(0)).sum() < 150:      # keep shapes visible
                colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
            img[mask] = colour
            if r > largest:
                largest, labels[i] = r, kind
        images[i] = img
    return images, labels


def shapes_dataset(size=32, n_train=10000, n_test=1000):
    """The built-in data: 32 x 32 scenes of one or two shapes, or (--data shapes64) 64 x 64 scenes
    of two to four, whose layout, colours and background are the global structure that a
    coarse top code of VQ-VAE-2 can carry."""
    count = (1, 2) if size == 32 else (2, 4)
    x_train, y_train = make_shapes(n_train, size, seed=1, count=count)
    x_test, y_test = make_shapes(n_test, size, seed=2, count=count)
    return {"train": x_train, "test": x_test, "train_labels": y_train, "test_labels": y_test,
            "num_classes": 3}


def read_idx(path):
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not -> uint8 array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":                                         # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: damaged or truncated gzip file ({e})")
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or not 1 <= raw[3] <= 4:
        raise UserError(f"{path}: bad magic number {raw[:4].hex() or '(empty file)'}, expected "
                        f"00000801..00000804 (an IDX file of unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise UserError(f"{path}: truncated or padded IDX file: {len(raw)} bytes, expected {expected} "
                        f"for dimensions {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# name -> (url, SHA-256) of the files we may download
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
    "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
    "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
    "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
}
DOWNLOADS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", MNIST_FILES),
    "fashion-mnist": ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", FASHION_FILES),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",
                {"cifar-10-binary.tar.gz": "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"}),
}


def download(dataset, name, folder):
    """Fetch one file over HTTPS into `folder`, verify its SHA-256, then move it into place."""
    base, files = DOWNLOADS[dataset]
    url, dest = base + name, Path(folder) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); are you offline? Put {name} into {folder} "
                        f"yourself and run again")
    digest = hashlib.sha256(data).hexdigest()
    if digest != files[name]:
        raise UserError(f"{url}: SHA-256 {digest} does not match the expected {files[name]}")
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def find_or_download(dataset, name, data_dir):
    """data_dir/<dataset>/name (or data_dir/name), gzipped or not; downloaded when absent."""
    for folder in (Path(data_dir) / dataset, Path(data_dir)):
        for candidate in (name, name.removesuffix(".gz")):
            if (folder / candidate).is_file():
                return folder / candidate
    return download(dataset, name, Path(data_dir) / dataset)


def mnist_dataset(dataset, data_dir):
    def load(prefix):
        images = read_idx(find_or_download(dataset, f"{prefix}-images-idx3-ubyte.gz", data_dir))
        labels = read_idx(find_or_download(dataset, f"{prefix}-labels-idx1-ubyte.gz", data_dir))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{dataset} {prefix}: images {images.shape} and labels {labels.shape} do not match")
        if 0 in images.shape:
            raise UserError(f"{dataset} {prefix}: no images in the file (shape {images.shape})")
        if labels.max() >= 10:
            raise UserError(f"{dataset} {prefix}: label {labels.max()} out of range [0, 10)")
        return images[..., None], labels.astype(np.int64)              # (N, 28, 28, 1)
    (x_train, y_train), (x_test, y_test) = load("train"), load("t10k")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"{dataset}: training images are {x_train.shape[1:3]}, test images {x_test.shape[1:3]}")
    return {"train": x_train, "test": x_test, "train_labels": y_train, "test_labels": y_test,
            "num_classes": 10}


CIFAR_RECORD = 1 + 3 * 32 * 32                                         # label byte, then R, G, B planes


def parse_cifar_batch(raw, name):
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise UserError(f"{name}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records "
                        f"(truncated file?)")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UserError(f"{name}: label {labels.max()} out of range; is this the CIFAR-10 *binary* version?")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return images, labels


def cifar10_dataset(data_dir):
    """The binary version of CIFAR-10, from extracted .bin files or the .tar.gz itself."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    folders = [Path(data_dir) / "cifar10" / "cifar-10-batches-bin", Path(data_dir) / "cifar-10-batches-bin"]
    folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
    if folder is not None:
        blobs = {n: (folder / n).read_bytes() for n in names}
    else:
        archive = find_or_download("cifar10", "cifar-10-binary.tar.gz", data_dir)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {n: tar.extractfile(f"cifar-10-batches-bin/{n}") for n in names}
                if None in members.values():                           # a folder or a link of that name
                    raise KeyError(f"{[n for n, m in members.items() if m is None][0]} is not a file")
                blobs = {n: m.read() for n, m in members.items()}
        except (tarfile.TarError, *READ_ERRORS) as e:
            raise unreadable(archive, "not a readable CIFAR-10 binary archive", e)
    parts = [parse_cifar_batch(blobs[n], n) for n in names]
    return {"train": np.concatenate([p[0] for p in parts[:5]]), "test": parts[5][0],
            "train_labels": np.concatenate([p[1] for p in parts[:5]]), "test_labels": parts[5][1],
            "num_classes": 10}


def to_nhwc(images, name):
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3, 4} -> (N, H, W, C)."""
    if images.dtype != np.uint8:
        raise UserError(f"{name}: expected uint8 images, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4 and images.shape[3] in (1, 3, 4):
        pass
    elif images.ndim == 4 and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)
    else:
        raise UserError(f"{name}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                        f"C in 1, 3, 4; got {images.shape}")
    if 0 in images.shape:
        raise UserError(f"{name}: no images (shape {images.shape})")
    return images


def to_labels(labels, n, name):
    """Class labels for n images: integers 0, 1, ... as a (n,) int64 array."""
    if labels.ndim != 1 or len(labels) != n:
        raise UserError(f"{name}: expected one label for each of the {n} images, shape ({n},); got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{name}: expected integer class labels, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise UserError(f"{name}: label {labels.min()} is negative; classes are numbered 0, 1, ...")
    return labels.astype(np.int64)


NPZ_ARRAYS = ("train", "test", "train_labels", "test_labels")  # what a dataset .npz may hold


def array_file_dataset(path):
    """A .npy of images (the last 10 % held out), or a .npz with 'train' and 'test' arrays (and, for
    classes, 'train_labels' and 'test_labels') or one array."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = loaded.files
                if "train" in keys and "test" in keys:
                    unknown = [k for k in keys if k not in NPZ_ARRAYS]
                    if unknown or ("train_labels" in keys) != ("test_labels" in keys):
                        raise UserError(f"{path}: expected arrays 'train' and 'test', and 'train_labels' and "
                                        f"'test_labels' for classes (both or neither); found {keys}")
                    train, test = to_nhwc(loaded["train"], f"{path}[train]"), to_nhwc(loaded["test"], f"{path}[test]")
                    if train.shape[1:] != test.shape[1:]:
                        raise UserError(f"{path}: train images are {train.shape[1:]} (H, W, C), test images "
                                        f"{test.shape[1:]}: they must match")
                    if "train_labels" not in keys:
                        return {"train": train, "test": test, "num_classes": 0}
                    y_train = to_labels(loaded["train_labels"], len(train), f"{path}[train_labels]")
                    y_test = to_labels(loaded["test_labels"], len(test), f"{path}[test_labels]")
                    num_classes = int(max(y_train.max(), y_test.max())) + 1
                    if not 2 <= num_classes <= len(train):
                        raise UserError(f"{path}: labels 0 to {num_classes - 1} for {len(train)} training images: "
                                        f"number the classes 0, 1, ..., with at least two")
                    return {"train": train, "test": test, "train_labels": y_train, "test_labels": y_test,
                            "num_classes": num_classes}
                if len(keys) != 1:
                    raise UserError(f"{path}: expected arrays 'train' and 'test', or a single array; found {keys}")
                images = to_nhwc(loaded[keys[0]], f"{path}[{keys[0]}]")
        else:
            images = to_nhwc(loaded, str(path))
    except READ_ERRORS as e:
        if "allow_pickle" in str(e):                                   # an object array
            raise UserError(f"{path}: holds Python objects, which are not read without pickle; save uint8 arrays")
        raise unreadable(path, "damaged or truncated file, or not a NumPy file", e)
    if len(images) < 2:
        raise UserError(f"{path}: need at least 2 images to hold some out, found {len(images)}")
    n_test = max(1, len(images) // 10)
    return {"train": images[:-n_test], "test": images[-n_test:], "num_classes": 0}


SHAPES = {"shapes": 32, "shapes64": 64}  # the built-in data, by name: their image size


def load_dataset(name, data_dir):
    if name in SHAPES:
        return shapes_dataset(SHAPES[name])
    if name in ("mnist", "fashion-mnist", "cifar10") and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir}: not a folder")
    if name in ("mnist", "fashion-mnist"):
        return mnist_dataset(name, data_dir)
    if name == "cifar10":
        return cifar10_dataset(data_dir)
    if name.endswith((".npy", ".npz")):
        return array_file_dataset(name)
    raise UserError(f"unknown dataset {name!r}: use shapes, shapes64, mnist, fashion-mnist, cifar10, or a .npy/.npz file")


def pad_to_multiple(images, m):
    """Edge-pad H and W up to multiples of m (the model's downsampling); metrics crop back."""
    N, H, W, C = images.shape
    ph, pw = -H % m, -W % m
    if ph == pw == 0:
        return images
    return np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


PIXEL_STD = 0.25  # about the standard deviation of image pixels in [0, 1]


def to_model(images):
    """uint8 -> float32 with mean near 0 and variance near 1. Unit variance weighs the
    reconstruction term against the VQ terms as sonnet's example does by dividing the MSE by
    the data variance (a Gaussian log-likelihood with that variance)."""
    return (images.astype(np.float32) / 255 - 0.5) / PIXEL_STD


def to_uint8(x):
    return np.clip(np.round((vqvae.to_numpy(x) * PIXEL_STD + 0.5) * 255), 0, 255).astype(np.uint8)


def batch_indices(seed, step, n, batch_size):
    """The examples of training step `step`. Each epoch is a shuffle seeded by (seed, epoch), so
    any step's batch can be recomputed from the step alone, which makes resuming exact."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    """The shuffle of one epoch, read-only, kept while the epoch lasts: drawing a permutation of
    20,000 takes 0.6 ms, more than 1 % of a prior step of 8 grids."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


# -----------------------------------------------------------------------------
# pictures: PNG written with the standard library's zlib


def write_png(path, img):
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> a PNG file (8-bit grey or RGB, no filtering)."""
    img = np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    H, W = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    rows = np.concatenate([np.zeros((H, 1), np.uint8), img.reshape(H, -1)], 1)  # filter byte 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
           + chunk(b"IEND", b""))
    atomic_write(path, png)


def image_grid(rows, scale=2, gap=2):
    """A list of uint8 batches (n, H, W, C), one per grid row -> one image with gaps between."""
    n, H, W, C = rows[0].shape
    grid = np.full((len(rows) * (H + gap) + gap, n * (W + gap) + gap, C), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[gap + r * (H + gap):gap + r * (H + gap) + H, gap + c * (W + gap):gap + c * (W + gap) + W] = img
    return grid.repeat(scale, 0).repeat(scale, 1)


# -----------------------------------------------------------------------------
# run folder: config, metrics, checkpoints (atomic, no pickle)


def atomic_write(path, data):
    """Write bytes to a temporary file beside `path`, then rename: a crash mid-write leaves the
    previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:                                               # a full disk, a read-only folder, ...
        try:
            tmp.unlink(missing_ok=True)                                # nothing half-written is left behind
        except OSError:
            pass                                                       # (a read-only folder never made it)
        kept = f"; the {path.name} that was there is kept" if path.is_file() else ""
        raise UserError(f"cannot write {path} ({e.strerror or e}){kept}")


def save_npz(path, arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def save_npy(path, array):
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


LABEL_DROPOUT = 0.1  # a class-conditional prior's training grids without their class (README, "The prior") ...
GUIDANCE = 1.5       # ... and the classifier-free guidance its samples are drawn with
COND_BLOCKS = 2      # two levels: residual blocks over the top codes that the bottom prior reads (README, VQ-VAE-2)
PRIOR_LAYERS = {1: 7, 2: 8}  # gated layers by levels; one level's prior adds an attention layer after them (README,
                             # "The prior": in the time of 8 gated layers alone, 0.03-0.04 fewer bits per code)


@dataclass
class TrainConfig:
    data: str = "shapes"          # shapes, shapes64, mnist, fashion-mnist, cifar10, or PATH.npy / PATH.npz
    data_dir: str = "data"        # where dataset files are found or downloaded to
    stage: str = "all"            # vqvae, prior, or all (the VQ-VAE, then the prior over its codes)
    steps: int = 3000             # VQ-VAE training steps
    batch_size: int = 32
    lr: float = 1e-3
    adam_beta1: float = 0.9       # the VQ-VAE's Adam: beta1 ...
    adam_beta2: float = 0.999     # ... and beta2 (VQGAN's are 0.5 and 0.9; README)
    seed: int = 0                 # data order, initialisation and sampling
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 500         # held-out evaluation, pictures and a checkpoint
    prior_steps: int = 6000       # PixelCNN prior training steps ...
    prior_batch_size: int = 8     # ... of this many code grids: a step costs ~ its batch; README, "The prior"
    prior_lr: float = 2e-3        # the prior's peak learning rate, reached after ...
    prior_warmup: int = 600       # ... a linear warm-up over this many steps, then a linear decay ...
    prior_decay_steps: int = 0    # ... to a tenth at this step (0: --prior-steps of the run's start); README
    top_prior_factor: int = 1     # two levels: the top prior trains this many times the steps, warm-up and decay
    prior_labels: bool = True     # condition the prior on the class labels, where the data has them
    prior_flip: bool = True       # also train the prior on the codes of mirrored training images (where valid)
    temperature: float = 1.0      # of the samples drawn at the end ...
    top_k: int = 0                # ... from the k most likely codes only (0: all) ...
    top_p: float = 1.0            # ... from the most likely codes that reach this probability (1: all) ...
    guidance: float | None = None  # ... with classifier-free guidance s (None: GUIDANCE for a prior trained with
                                  # label dropout, else 1 = none)
    evaluate: bool = True         # measure the samples at the end (train.py evaluate)
    judge_steps: int = 1500       # training steps of the evaluation's judge network
    eval_images: int = 1000       # held-out images the evaluation measures, and as many samples
    adversarial: bool = False     # VQGAN's patch discriminator and adversarial loss (vqvae.VQGAN)
    disc_start: int = 500         # the VQ-VAE step at which the discriminator starts (trained and used)
    disc_weight: float = 0.8      # w of the adaptive weight lambda (VQGAN's discriminator_weight)
    disc_layers: int = 2          # stride-2 convolutions of the discriminator (32 x 32: 6 x 6 patches of 34 px)
    disc_width: int = 16          # channels of its first convolution (then 2x each layer, at most 8x)
    disc_lr: float = 1e-3         # Adam learning rate of the discriminator (the VQ-VAE's)

    def __post_init__(self):
        """Every setting checked before anything is read or trained; a ValueError names it."""
        vqvae.check_fields(self)
        for name in ("steps", "batch_size", "log_every", "eval_every", "prior_steps", "prior_batch_size",
                     "top_prior_factor", "judge_steps", "disc_layers", "disc_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "prior_lr", "disc_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("prior_warmup", "prior_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be at least 0 (0: no truncation), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (1: no truncation), got {self.top_p}")
        if self.guidance is not None:
            if not vqvae.is_real(self.guidance) or not self.guidance >= 0:
                raise ValueError(f"--guidance must be a finite number >= 0 (1: none), got {self.guidance!r}")
            self.guidance = float(self.guidance)
        if self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"--disc-start must be a step >= 0, got {self.disc_start}")
        if not self.disc_weight >= 0:
            raise ValueError(f"--disc-weight must be a finite number >= 0, got {self.disc_weight}")
        if self.eval_images < 2:
            raise ValueError(f"--eval-images must be at least 2, got {self.eval_images}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_dict(cls, d):
        return vqvae.config_from_dict(cls, d)


STAGES, DEVICES = ("vqvae", "prior", "all"), ("auto", "cpu", "gpu")
DISC_BETAS = (0.5, 0.9)  # the discriminator's Adam: VQGAN's (for both its networks), the usual beta1 of GANs; not tuned here


def check_finite(arrays, what):
    """A NonFiniteError naming the first array of `arrays` that holds NaN or inf."""
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise vqvae.NonFiniteError(f"{what} {k!r} holds NaN or infinite values")


def save_checkpoint(path, model, opt, step, wall_time, disc=None, disc_opt=None, **notes):
    """Parameters (and EMA buffers), optimiser state, step and time so far, the model's config,
    and any `notes` (strings), in one .npz that loads without pickle; VQVAE.load / PixelCNN.load
    read it directly. An adversarial run adds its discriminator ('disc.*') and the discriminator's
    Adam ('disc_opt.*'). A state that is not finite is never written."""
    state, opt_state = model.state_dict(), {f"opt.{k}": v for k, v in opt.state_dict().items()}
    if disc is not None:
        state.update({f"disc.{k}": vqvae.to_numpy(v) for k, v in disc.params.items()})
        opt_state.update({f"disc_opt.{k}": v for k, v in disc_opt.state_dict().items()})
    check_finite(state, "parameter")
    check_finite(opt_state, "optimiser array")
    arrays = {**state, **opt_state,
              "config": np.array(json.dumps(asdict(model.cfg))),
              "step": np.array(step), "wall_time_s": np.array(wall_time), **{k: np.array(v) for k, v in notes.items()}}
    save_npz(path, arrays)
    return path


def load_checkpoint(path, model, opt, disc=None, disc_opt=None):
    """Restore model and optimiser (and an adversarial run's discriminator and its optimiser)
    from a training checkpoint -> its step, time and notes."""
    try:
        with np.load(path, allow_pickle=False) as f:
            model.load_state_dict(f)
            opt.load_state_dict({k[4:]: f[k] for k in f.files if k.startswith("opt.")})
            if disc is not None:
                vqvae.load_arrays({f"disc.{k}": v for k, v in disc.params.items()}, f, model.xp)
                disc_opt.load_state_dict({k[9:]: f[k] for k in f.files if k.startswith("disc_opt.")})
            step, wall = f["step"], f["wall_time_s"]
            if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0 or not np.isfinite(wall).all():
                raise ValueError(f"step {step} and wall_time_s {wall} are not a step count and a time")
            notes = {k: str(f[k]) for k in f.files if k in CHECKPOINT_NOTES}
            return int(step), float(wall), notes
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint to resume from")
    except READ_ERRORS as e:
        raise unreadable(path, "cannot resume from this checkpoint", e)


CHECKPOINT_NOTES = ("vqvae_sha256",)  # a prior's: the VQ-VAE whose codes it was fitted to


def load_model(path, cls, device):
    """A trained model from a run's checkpoint, with a clear error for a missing or broken file."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        return cls.load(path, device=device)
    except vqvae.DeviceError:
        raise
    except READ_ERRORS as e:
        raise unreadable(path, "cannot load the model", e)


def checkpoint_note(path, key):
    """One note of a checkpoint (None where it has none), read without loading the arrays."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return str(f[key]) if key in f.files else None
    except READ_ERRORS as e:
        raise unreadable(path, "unreadable checkpoint", e)


def fingerprint(model):
    """SHA-256 of a model's parameters and buffers: a prior records the VQ-VAE whose codes it
    models, so that it is never paired with the codes of another."""
    h = hashlib.sha256()
    for k, a in sorted(model.state_dict().items()):
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# evaluation, pictures, codes


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


def prior_grid(codes):
    """A level's codes as the grid its prior models: residual codes (N, S, h, w) become
    (N, h, w S), a position's S codes side by side (ResidualVQ.to_grid)."""
    return vqvae.ResidualVQ.to_grid(codes) if codes.ndim == 4 else codes


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


def evaluate_prior(prior, codes, labels, cond_codes, batch_size, name):
    """Held-out negative log-likelihood of the codes, in bits per code, over the whole split."""
    total = 0.0
    for i in range(0, len(codes), batch_size):
        part = slice(i, i + batch_size)
        stats = prior.loss(codes[part], None if labels is None else labels[part],
                           cond_codes=None if cond_codes is None else cond_codes[part])
        total += float(stats["bits_per_code"]) * len(codes[part])
    return {f"{name}_val_bits_per_code": total / len(codes)}


def recon_grid(model, images, real_hw, n=8, top_only=False):
    """Up to two groups of rows of n images: originals over their reconstructions (and, with
    top_only, over the reconstructions from the top codes alone)."""
    h, w = real_hw
    x = images[:2 * n]
    codes = encode_all(model, x)
    shown = [x[:, :h, :w], to_uint8(model.decode(*codes))[:, :h, :w]]
    if top_only:
        shown.insert(1, to_uint8(model.decode(codes[0]))[:, :h, :w])
    rows = [s[:n] for s in shown]
    if len(x) == 2 * n:
        rows += [s[n:] for s in shown]
    return image_grid(rows)


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
        codes = [vqvae.ResidualVQ.from_grid(c, S) for c in codes]     # (N, h, w S) -> (N, S, h, w)
    images = np.concatenate([to_uint8(model.decode(*(c[i:i + batch_size] for c in codes)))[:, :h, :w]
                             for i in range(0, N, batch_size)])
    return images, codes, seconds


def draw_samples(model, priors, rows, per_row, seed, rule, real_hw):
    """A grid of new images, one row per class when the priors are class-conditional
    -> (grid, codes per level, seconds spent sampling the codes)."""
    labels = np.repeat(np.arange(rows), per_row) if priors[0].cfg.num_classes else None
    images, codes, seconds = sample_images(model, priors, rows * per_row, seed, rule, real_hw, labels)
    return image_grid([images[r * per_row:(r + 1) * per_row] for r in range(rows)]), codes, seconds


# -----------------------------------------------------------------------------
# the judge: a small classifier trained on the real training images, in whose features the
# samples and reconstructions are measured (train.py evaluate)


@dataclass
class JudgeConfig:
    in_channels: int = 3          # C of the images
    num_classes: int = 3          # the data's classes; without labels, the rotations it tells apart
    width: int = 16               # w: channels of the first layer (then 2w, 2w, 4w)
    rotations: bool = False       # True: trained to tell by how much an image was rotated (no labels)
    dtype: str = "float32"
    seed: int = 0                 # initialisation and the order of its training batches

    def __post_init__(self):
        vqvae.check_fields(self)
        for name in ("in_channels", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d):
        return vqvae.config_from_dict(cls, d)


class Judge:
    """x (N, H, W, C) -> logits (N, K): a 3x3 conv, two 4x4 convs of stride 2, a 3x3 conv, with
    a ReLU after each, then the mean over positions and a linear layer (a 1x1 conv). The mean
    vector, 4w numbers, is an image's feature, as FID uses Inception's pool features."""

    def __init__(self, cfg, device=None):
        self.cfg, self.xp = cfg, vqvae.backend(device)
        init = vqvae.uniform_init(np.random.default_rng(cfg.seed), self.xp, cfg.dtype)
        w = cfg.width
        self.features = vqvae.Sequential(
            vqvae.Conv2d(cfg.in_channels, w, 3, padding=1, init=init, input_grad=False), vqvae.ReLU(),
            vqvae.Conv2d(w, 2 * w, 4, stride=2, padding=1, init=init), vqvae.ReLU(),        # H/2
            vqvae.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1, init=init), vqvae.ReLU(),    # H/4
            vqvae.Conv2d(2 * w, 4 * w, 3, padding=1, init=init), vqvae.ReLU(),
            vqvae.MeanPool())                                                                 # (N, 1, 1, 4w)
        self.head = vqvae.Conv2d(4 * w, cfg.num_classes, 1, init=init)
        self.parts = {"features": self.features, "head": self.head}

    @property
    def params(self):
        return vqvae.gather(self.parts, "params")

    @property
    def grads(self):
        return vqvae.gather(self.parts, "grads")

    def forward(self, x):
        return self.head.forward(self.features.forward(self.xp.asarray(x, dtype=self.cfg.dtype)))[:, 0, 0]  # (N, K)

    def loss(self, x, labels):
        logits = self.forward(x)
        labels = self.xp.asarray(labels)
        loss, self.dlogits = vqvae.softmax_cross_entropy(logits, labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).mean()}

    def backward(self):
        self.features.backward(self.head.backward(self.dlogits[:, None, None, :]))  # logits = head(mean(features))

    def train_step(self, x, labels, opt):
        stats = self.loss(x, labels)
        self.backward()
        opt.step(self.grads)
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


def train_judge(data, seed, steps, device, batch_size=64, lr=2e-3, log=None):
    """A judge trained on the real training split only (the held-out images are what it measures)."""
    images = pad_to_multiple(data["train"], 4)                         # at least 4 x 4 for the two stride-2 layers
    labels, K, rotations = judge_task(data)
    judge = Judge(JudgeConfig(in_channels=images.shape[3], num_classes=K, rotations=rotations, seed=seed), device)
    opt = vqvae.Adam(judge.params, lr=lr)
    batch_size = min(batch_size, len(images))
    for s in range(steps):
        idx = batch_indices(seed, s, len(images), batch_size)
        x = images[idx]
        if rotations:                                                  # K = 4 quarter turns, or 2 half turns
            y = np.random.default_rng([seed, s]).integers(0, K, len(idx))
            x = rotate(x, y * (4 // K))
        else:
            y = labels[idx]
        stats = judge.train_step(to_model(x), y, opt)
        if log and (s + 1) % 250 == 0:
            log(f"judge {s + 1}/{steps} loss {float(stats['loss']):.4g} accuracy {float(stats['accuracy']):.3f}")
    return judge


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


def sample_figures(judge, real, recon, samples, real_labels=None, sample_labels=None):
    """The evaluation's figures from uint8 image sets of the same size n: held-out real images,
    their reconstructions, and samples. Each Frechet distance compares disjoint halves (n/2
    against n/2), and so do precision and recall, so that every figure and its floor (or, for
    precision, recall and accuracy, its ceiling) come from sets of the same size."""
    (f_real, p_real), (f_rec, p_rec) = judge.embed(real), judge.embed(recon)
    h = len(real) // 2
    A, B = slice(0, h), slice(h, 2 * h)
    fig = {"fd_real_halves": frechet_distance(f_real[A], f_real[B]),   # the floor of fd_recon_real
           "fd_recon_real": frechet_distance(f_rec[A], f_real[B]),
           "fd_recon_halves": frechet_distance(f_rec[A], f_rec[B])}    # the floor of fd_samples_recon
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


def reconstruct_images(model, images, batch_size=256):
    """uint8 images -> uint8 reconstructions of the same size (padded for the model, cropped back)."""
    h, w = images.shape[1:3]
    return np.concatenate([to_uint8(model.reconstruct(to_model(pad_to_multiple(images[i:i + batch_size],
                                                                                 model.downsample))))[:, :h, :w]
                           for i in range(0, len(images), batch_size)])


def judge_for(run, data, seed, steps, device):
    """The run's judge of this seed: loaded from RUN/judge_seed<seed>.npz, or trained on the run's
    training split and saved there (a judge of other data or steps is trained anew)."""
    path = run / f"judge_seed{seed}.npz"
    _, K, rotations = judge_task(data)
    if path.is_file():
        judge = load_model(path, Judge, device)
        if (judge.cfg.in_channels, judge.cfg.num_classes, judge.cfg.rotations) == (data["train"].shape[3], K, rotations) \
                and checkpoint_note(path, "steps") == str(steps):
            return judge
    t = time.time()
    judge = train_judge(data, seed, steps, device, log=lambda text: print(text, file=sys.stderr))
    save_npz(path, {**judge.state_dict(), "config": np.array(json.dumps(asdict(judge.cfg))), "steps": np.array(str(steps)),
                    "train_time_s": np.array(time.time() - t)})
    return judge


def evaluate_samples(run, model, priors, data, real_hw, judge_seed, judge_steps, n, seed, rule, device):
    """Train or load the judge, then measure n held-out images, their reconstructions and n
    samples (an equal number of each class, for a class-conditional prior) -> the figures."""
    t = time.time()
    judge = judge_for(run, data, judge_seed, judge_steps, device)
    n = min(n, len(data["test"]))
    real = data["test"][:n]
    real_labels = data["test_labels"][:n] if "test_labels" in data else None
    num_classes = priors[0].cfg.num_classes if priors else 0
    sample_labels = np.arange(n) % num_classes if num_classes else None
    samples = sample_images(model, priors, n, seed, rule, real_hw, sample_labels)[0] if priors else None
    fig = sample_figures(judge, real, reconstruct_images(model, real), samples, real_labels, sample_labels)
    return {"judge_seed": judge_seed, "judge_steps": judge_steps, "judge_task": "rotation" if judge.cfg.rotations
            else "class", "images": n, "sample_seed": seed, **rule, **fig,
            "evaluate_time_s": time.time() - t}


def evaluation_table(ev):
    """The figures as a small table, each beside the floor it is read against."""
    rows = [("Frechet distance in the judge's features", "", ""),
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


# -----------------------------------------------------------------------------
# the run report: report.html, curves as inline SVG, written with the standard library


def read_metrics(path):
    """metrics.jsonl -> its records; a damaged line (the last one of a killed run) is skipped."""
    records = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("stage"), str) and isinstance(record.get("step"), int):
            records.append(record)
    return records


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def nice_ticks(lo, hi, n=4):
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def svg_chart(title, series, log_y=False, width=460, height=230):
    """A line chart: series = [(name, [(step, value), ...], held_out)], training series as lines,
    held-out ones as dots. Non-finite values (and, on a log scale, values <= 0) are left out."""
    per_row = 4                                                        # legend entries per row, above the plot
    L, R, B = 58, 24, 34                                               # margins; the top one holds the legend
    T_ = 26 + 14 * math.ceil(len(series) / per_row)
    keep = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log_y)
    series = [(name, [(x, math.log10(y) if log_y else y) for x, y in pts if keep(y)], held) for name, pts, held in series]
    xs = [x for _, pts, _ in series for x, _ in pts]
    ys = [y for _, pts, _ in series for _, y in pts]
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
           f'<text x="{L}" y="15" class="title">{html.escape(title)}{" (log scale)" if log_y else ""}</text>']
    if not ys:
        return "".join(out) + f'<text x="{L}" y="{height // 2}">no finite values</text></svg>'
    x0 = min(0, min(xs))
    x1 = max(max(xs), x0 + 1)                                          # a single step still spans the axis
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    y0, y1 = y0 - 0.04 * (y1 - y0), y1 + 0.04 * (y1 - y0)              # no dot on the frame
    px = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)
    py = lambda y: height - B - (y - y0) / (y1 - y0) * (height - T_ - B)
    if log_y and y1 - y0 >= 2:                                         # whole decades
        ticks = range(math.ceil(y0), math.floor(y1) + 1)
    elif log_y:                                                        # under two decades: round values
        ticks = [math.log10(t) for t in nice_ticks(10 ** y0, 10 ** y1, 5) if t > 0]
    else:
        ticks = nice_ticks(y0, y1)
    drawn = []
    for t in ticks:                                                    # grid and y labels, 14 px apart at least
        if any(abs(py(t) - d) < 14 for d in drawn):
            continue
        drawn.append(py(t))
        label = f"{10 ** t:.3g}" if log_y else f"{t:.4g}"
        out.append(f'<line x1="{L}" x2="{width - R}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{L - 4}" y="{py(t) + 4:.1f}" class="ylabel">{label}</text>')
    for t in nice_ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{height - B + 14}" class="xlabel">{t:g}</text>')
    out.append(f'<text x="{width - R}" y="{height - 4}" class="xlabel end">step</text>')
    for i, (name, pts, held) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if held:
            dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"/>' for x, y in pts)
            out.append(f'<g fill="{colour}" data-series="{html.escape(name)}" data-points="{len(pts)}">{dots}</g>')
        else:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{line}" stroke="{colour}" data-series="{html.escape(name)}" '
                       f'data-points="{len(pts)}"/>')
        out.append(f'<text x="{L + (width - L - R) // per_row * (i % per_row)}" y="{30 + 14 * (i // per_row)}" '
                   f'fill="{colour}" class="legend">'
                   f'{"&#9679; " if held else "&#8212; "}{html.escape(name)}</text>')
    return "".join(out) + "</svg>"


def stage_charts(stage, records):
    """The charts of one stage from its metrics: training values as lines, held-out as dots."""
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "loss" not in r]

    def pts(rows, key):
        return [(r["step"], r[key]) for r in rows if key in r]

    if stage == "vqvae":
        parts = [k for k in ("loss", "recon", "vq", "codebook", "commitment") if any(k in r for r in train)]
        charts = [svg_chart("VQ-VAE loss and its parts", [(k, pts(train, k), False) for k in parts], log_y=True),
                  svg_chart("held-out MSE (two levels: also from the top code alone)", [
                      (k, pts(held, k), True) for k in ("val_mse", "top_only_mse")
                      if k == "val_mse" or any(k in r for r in held)], log_y=True),
                  svg_chart("held-out PSNR (dB)", [("val_psnr", pts(held, "val_psnr"), True)])]
        levels = ["top_", ""] if any("top_perplexity" in r for r in records) else [""]
        charts.append(svg_chart("perplexity of the codes", [
            (f"{p}{label}", pts(rows, f"{p}perplexity"), rows is held)
            for p in levels for label, rows in (("batch", train), ("held out", held))], log_y=True))
        charts.append(svg_chart("share of the codes used", [
            (f"{p}{label}", pts(rows, f"{p}{key}"), rows is held)
            for p in levels for label, rows, key in (("batch", train, "usage"), ("held out", held, "codes_used"))]))
        if any("disc_loss" in r for r in train):                       # VQGAN: from the discriminator's start
            charts.append(svg_chart("adversarial: D's hinge loss, L_GAN, lambda, mean logits", [
                (k, pts(train, k), False) for k in ("disc_loss", "gan", "gan_weight", "logits_real", "logits_fake")]))
        return charts
    return [svg_chart(f"{stage}: bits per code", [("training", pts(train, "bits_per_code"), False),
                                                  ("held out", pts(held, f"{stage}_val_bits_per_code"), True)])]


def read_optional_json(path):
    try:
        value = json.loads(Path(path).read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def key_values(d):
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
                   for k, v in d.items() if not isinstance(v, (dict, list)) or k == "image_hw")
    return f"<table>{rows}</table>"


REPORT_STYLE = """body{font:14px/1.4 system-ui,sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chart{border:1px solid #ddd;background:#fff;max-width:100%;height:auto}
.chart polyline{fill:none;stroke-width:1.5}.chart .grid{stroke:#eee}.chart text{font-size:11px;fill:#444}
.chart .title{font-weight:600;fill:#222}.chart .ylabel{text-anchor:end}.chart .xlabel{text-anchor:middle}
.chart .end{text-anchor:end}table{border-collapse:collapse;margin:.5em 0}th,td{padding:2px 10px;text-align:left;
border-bottom:1px solid #eee;font-variant-numeric:tabular-nums}th{font-weight:500;color:#555}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}
.cols{display:flex;flex-wrap:wrap;gap:2em}@media print{body{max-width:none}.chart,img{break-inside:avoid}}"""


def report_html(run):
    """The page for a run folder, from whatever of its files are there and readable."""
    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    config, summary = read_optional_json(run / "config.json"), read_optional_json(run / "summary.json")
    evaluation = read_optional_json(run / "evaluation.json")
    stages = list(dict.fromkeys(r["stage"] for r in records))
    body = [f"<h1>VQ-VAE run {html.escape(run.name)}</h1>",
            f"<p>{html.escape(str(summary.get('data', config.get('train', {}).get('data', '?'))))}, "
            f"{len(records)} metric records, stages: {html.escape(', '.join(stages) or 'none yet')}. "
            f"Lines: training (every --log-every steps); dots: held out.</p>"]
    for stage in stages:
        body.append(f"<h2>{html.escape(stage)}</h2><div class='charts'>"
                    + "".join(stage_charts(stage, [r for r in records if r["stage"] == stage])) + "</div>")
    pictures = [(name, title) for name, title in (("recon.png", "held-out images over their reconstructions"),
                                                  ("recon_top.png", "originals, top code only, both levels"),
                                                  ("samples.png", "samples (a row per class)")) if (run / name).is_file()]
    if pictures:
        body.append("<h2>pictures</h2><div class='cols'>" + "".join(
            f"<figure><img src='{name}' alt='{title}'><figcaption>{name}: {title}</figcaption></figure>"
            for name, title in pictures) + "</div>")
    if evaluation:
        try:
            table = evaluation_table(evaluation)
        except (KeyError, TypeError, ValueError):
            table = json.dumps(evaluation, indent=2)
        body.append(f"<h2>evaluation (train.py evaluate)</h2><pre>{html.escape(table)}</pre>")
    if summary:
        body.append("<h2>summary</h2>" + key_values(summary))
    if config:
        body.append("<h2>configuration</h2><div class='cols'>" + "".join(
            f"<div><h3>{html.escape(str(part))}</h3>{key_values(v if isinstance(v, dict) else {})}</div>"
            for part, v in [*((k, config[k]) for k in ("train", "model") if k in config),
                            *((f"prior {i}", p) for i, p in enumerate(config.get("priors", [])))]) + "</div>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{REPORT_STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(run):
    atomic_write(Path(run) / "report.html", report_html(run).encode())


# -----------------------------------------------------------------------------
# the training loop both stages share


class CtrlC:
    """While active, the first Ctrl-C asks the loop to save and stop after the current step;
    a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class Progress:
    """One live line on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.live = stream, stream.isatty()

    def show(self, text, final=False):
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def fit(stage, step_fn, evaluate_fn, save_fn, start, steps, batch_size, cfg, xp, log, stop, checkpoint):
    """Steps start..steps of one stage. step_fn(step) trains on that step's batch and returns
    its stats as device scalars. They stay on the device until every log_every steps, when
    they come to the host in one sync. Every eval_every steps and at the end: evaluate_fn(step)
    and save_fn(step) -> path. A non-finite loss, gradient or state stops the run before
    anything non-finite is saved, saying which checkpoint holds the last good state (start > 0:
    the one resumed from). Returns the last evaluation; on Ctrl-C, saves and raises Interrupted."""
    window, step = [], start
    t_log, step_log = time.time(), start
    saved = start if start > 0 else None                               # the step of `checkpoint`, if any

    def kept():
        return (f"{checkpoint} holds the last good state, step {saved}" if saved is not None else
                f"No checkpoint of this stage was saved (the first comes at step {min(cfg.eval_every, steps)})")

    def diverged(what):
        return UserError(f"{stage}: {what}; stopping. {kept()}. A lower learning rate may help")

    def flush():
        nonlocal window, t_log, step_log
        if not window:
            return
        losses = vqvae.to_numpy(xp.stack([s["loss"] for s in window]))
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            raise diverged(f"the loss became {losses[bad[0]]} at step {step_log + bad[0] + 1}")
        keys = [k for k in window[0] if not k.endswith("codes")]     # scalars only
        mean = {k: float(np.mean(vqvae.to_numpy(xp.stack([s[k] for s in window])))) for k in keys}
        now = time.time()
        rate = len(window) * batch_size / max(now - t_log, 1e-9)
        log({"stage": stage, "step": step, **mean, "items_per_s": rate},
            f"{stage} {step}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in mean.items())
            + f" | {rate:.0f}/s ETA {(steps - step) * batch_size / rate:.0f}s", final=False)
        window, t_log, step_log = [], now, step

    def save(s):
        nonlocal saved
        flush()                                                        # a bad loss stops before the save
        try:
            path = save_fn(s)
        except vqvae.NonFiniteError as e:
            raise diverged(f"at step {s}, {e}")
        except UserError as e:                                         # a full disk, say
            raise UserError(f"{e}. {kept()}")
        saved = s
        return path

    ev = None
    while step < steps and not stop.requested:
        try:
            window.append(step_fn(step))
        except vqvae.NonFiniteError as e:                              # the step changed nothing
            flush()
            raise diverged(f"at step {step + 1}, {e}")
        step += 1
        if step % cfg.log_every == 0:
            flush()
        if step % cfg.eval_every == 0 or step == steps:
            flush()
            try:
                ev = evaluate_fn(step)                                 # writes a picture
            except UserError as e:                                     # a full disk, say
                raise UserError(f"{e}. {kept()}")
            save(step)
            log({"stage": stage, "step": step, **ev},
                f"{stage} {step}/{steps} held out: " + " ".join(f"{k} {v:.4g}" for k, v in ev.items()), final=True)
    if stop.requested:
        path = save(step)
        raise Interrupted(f"{stage} stage interrupted at step {step}, saved in {path}. "
                          f"Continue with: python train.py --resume {path.parent}")
    if ev is None:                                                     # nothing left to train: just evaluate
        ev = evaluate_fn(step)
    return ev


# -----------------------------------------------------------------------------
# command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (its usage of some forty flags is a wall of text)
    and without abbreviated flags: '--batch 4' is an error, not a silent '--batch-size 4'
    that a resumed run's check for changed flags would not see."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def int_list(text):
    """'8,6,5' -> (8, 6, 5), for argparse."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def add_sampling_flags(group, t, temperature_help):
    group.add_argument("--temperature", type=float, default=t.temperature, help=temperature_help)
    group.add_argument("--top-k", type=int, default=t.top_k, help="sample from the k most likely codes only (0: all)")
    group.add_argument("--top-p", type=float, default=t.top_p,
                       help="sample from the fewest most likely codes whose probability reaches p (nucleus; 1: all)")
    group.add_argument("--guidance", type=float, default=t.guidance,
                       help=f"classifier-free guidance scale s of a class-conditional prior trained with label dropout "
                            f"(1: none; default {GUIDANCE} for such a prior, else 1)")


def sampling_rule(settings, prior_cfgs):
    """temperature, top_k, top_p and guidance of a TrainConfig or of parsed flags, checked against
    the PriorConfigs of the priors that will sample -> prior.sample's keywords. Guidance not
    given: GUIDANCE when every prior was trained with label dropout (it knows the grids without
    a class), else 1 (none)."""
    rule = {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
            "guidance": settings.guidance}
    if not (math.isfinite(rule["temperature"]) and rule["temperature"] >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {rule['temperature']}")
    if rule["top_k"] < 0 or not 0 < rule["top_p"] <= 1:
        raise UserError(f"--top-k must be at least 0 and --top-p in (0, 1], got {rule['top_k']} and {rule['top_p']}")
    guided = bool(prior_cfgs) and all(c.label_dropout > 0 for c in prior_cfgs)
    if rule["guidance"] is None:
        rule["guidance"] = GUIDANCE if guided else 1.0
    elif not (math.isfinite(rule["guidance"]) and rule["guidance"] >= 0):
        raise UserError(f"--guidance must be a finite number >= 0 (1: none), got {rule['guidance']}")
    elif rule["guidance"] != 1 and prior_cfgs and not guided:
        raise UserError(f"--guidance {rule['guidance']} needs a class-conditional prior trained with "
                        f"--prior-label-dropout > 0; this run's prior{'s were' if len(prior_cfgs) > 1 else ' was'} not")
    return rule


def build_parser():
    p = ArgumentParser(prog="train.py", description="Train a VQ-VAE (van den Oord et al. 2017), then a PixelCNN "
                                                    "prior over its codes, and sample new images.",
                       epilog="Subcommands: 'python train.py encode --help', 'python train.py sample --help', "
                              "'python train.py evaluate --help', 'python train.py report --help'.")
    t, m, pc = TrainConfig(), vqvae.Config(), P.PriorConfig()
    run = p.add_argument_group("run")
    run.add_argument("--data", default=t.data, help="shapes (32 x 32), shapes64 (64 x 64), mnist, fashion-mnist, "
                                                    "cifar10, or PATH.npy|PATH.npz (uint8 images; an .npz with "
                                                    "train, test and optionally train_labels, test_labels)")
    run.add_argument("--data-dir", default=t.data_dir, help="where dataset files are found or downloaded to")
    run.add_argument("--out", default=None, help="run folder (default: runs/<data>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR")
    run.add_argument("--stage", default=t.stage, choices=STAGES,
                     help="train the VQ-VAE, the prior over its codes (needs --resume), or both")
    run.add_argument("--seed", type=int, default=t.seed, help="seed of the data order, initialisation and sampling")
    run.add_argument("--device", default=t.device, choices=DEVICES, help="gpu needs CuPy")
    run.add_argument("--log-every", type=int, default=t.log_every, help="steps between progress lines")
    run.add_argument("--eval-every", type=int, default=t.eval_every, help="held-out evaluation, pictures, checkpoint")
    model = p.add_argument_group("VQ-VAE")
    model.add_argument("--steps", type=int, default=t.steps, help="VQ-VAE training steps")
    model.add_argument("--batch-size", type=int, default=t.batch_size, help="images per step")
    model.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    model.add_argument("--adam-beta1", type=float, default=t.adam_beta1, help="Adam's beta1 for the VQ-VAE (VQGAN: 0.5)")
    model.add_argument("--adam-beta2", type=float, default=t.adam_beta2, help="Adam's beta2 for the VQ-VAE (VQGAN: 0.9)")
    model.add_argument("--hidden", type=int, default=64, help="H: encoder/decoder channels")
    model.add_argument("--res-hidden", type=int, default=32, help="RH: residual block hidden channels")
    model.add_argument("--res-blocks", type=int, default=m.res_blocks, help="R: residual blocks")
    model.add_argument("--levels", type=int, default=m.levels, choices=[1, 2],
                       help="1: VQ-VAE; 2: VQ-VAE-2 with top (/8) and bottom (/4) codes (at --code-stride 4)")
    model.add_argument("--code-stride", type=int, default=m.code_stride, choices=[4, 8],
                       help="image size over the (bottom) code grid's size; the top code's is twice it")
    model.add_argument("--top-only-rate", type=float, default=m.top_only_rate,
                       help="two levels: the share of training images decoded from the top code alone, so "
                            "that the top code carries the scene's colours and layout by itself (README)")
    model.add_argument("--codebook-size", "-K", type=int, default=256,
                       help="K: number of codes (for fsq, the product of --fsq-levels instead)")
    model.add_argument("--top-codebook-size", type=int, default=m.top_codebook_size,
                       help="two levels: K of the top codebook, if not --codebook-size (0); fewer top codes are "
                            "easier for the top prior to model (README)")
    model.add_argument("--code-dim", "-D", type=int, default=32, help="D: code vector dimension")
    model.add_argument("--beta", type=float, default=m.beta, help="commitment cost")
    q = p.add_argument_group("quantizer")
    q.add_argument("--quantizer", default="ema", choices=vqvae.QUANTIZERS,
                   help="vq: codebook learned by its loss term; ema: by moving averages; rvq: residual VQ; "
                        "fsq: finite scalar quantization; lfq: lookup-free (K = 2^bits); gumbel: Gumbel-softmax")
    q.add_argument("--ema-decay", type=float, default=m.ema_decay, help="gamma of the EMA codebook and of code usage")
    q.add_argument("--kmeans-init", default=m.kmeans_init, action=argparse.BooleanOptionalAction,
                   help="vq, ema, rvq: start the codebook as k-means of the first batch's encoder outputs")
    q.add_argument("--restart-threshold", type=float, default=m.restart_threshold,
                   help="vq, ema, rvq: re-seed a code whose moving-average uses per batch fall below this "
                        "(Jukebox uses 1); 0: never")
    q.add_argument("--rvq-stages", type=int, default=m.rvq_stages, help="rvq: S, residual stages")
    q.add_argument("--fsq-levels", type=int_list, default=m.fsq_levels, metavar="L1,L2,...",
                   help="fsq: levels per dimension; the codes are their product")
    q.add_argument("--lfq-entropy-weight", type=float, default=m.lfq_entropy_weight, help="lfq: entropy penalty weight")
    q.add_argument("--lfq-temperature", type=float, default=m.lfq_temperature, help="lfq: entropy penalty temperature")
    q.add_argument("--gumbel-kl-weight", type=float, default=m.gumbel_kl_weight, help="gumbel: weight of KL to uniform")
    q.add_argument("--gumbel-temperature", type=float, default=m.gumbel_temperature,
                   help="gumbel: softmax temperature at the start ...")
    q.add_argument("--gumbel-temperature-min", type=float, default=m.gumbel_temperature_min, help="... at the end of ...")
    q.add_argument("--gumbel-anneal-steps", type=int, default=m.gumbel_anneal_steps, help="... the annealing steps")
    gan = p.add_argument_group("adversarial loss (VQGAN, Esser et al. 2021)")
    gan.add_argument("--adversarial", default=t.adversarial, action=argparse.BooleanOptionalAction,
                     help="train the VQ-VAE against a patch discriminator as well (hinge loss, adaptive weight)")
    gan.add_argument("--disc-start", type=int, default=t.disc_start,
                     help="the VQ-VAE step at which the discriminator starts; before it, MSE and VQ terms only")
    gan.add_argument("--disc-weight", type=float, default=t.disc_weight,
                     help="w: the adversarial term's weight, times the adaptive lambda")
    gan.add_argument("--disc-layers", type=int, default=t.disc_layers, help="stride-2 convolutions of the discriminator")
    gan.add_argument("--disc-width", type=int, default=t.disc_width, help="channels of its first convolution")
    gan.add_argument("--disc-lr", type=float, default=t.disc_lr, help="Adam learning rate of the discriminator")
    prior = p.add_argument_group("PixelCNN prior")
    prior.add_argument("--prior-steps", type=int, default=t.prior_steps, help="prior training steps")
    prior.add_argument("--prior-batch-size", type=int, default=t.prior_batch_size, help="code grids per step")
    prior.add_argument("--prior-lr", type=float, default=t.prior_lr, help="peak Adam learning rate of the prior ...")
    prior.add_argument("--prior-warmup", type=int, default=t.prior_warmup, help="... reached after a linear warm-up "
                                                                                 "over this many steps ...")
    prior.add_argument("--prior-decay-steps", type=int, default=t.prior_decay_steps,
                       help="... then decayed linearly to a tenth of it at this step (0: at --prior-steps)")
    prior.add_argument("--top-prior-factor", type=int, default=t.top_prior_factor,
                       help="two levels: the top prior trains this many times --prior-steps, its warm-up and decay "
                            "stretched alike")
    prior.add_argument("--prior-dropout", type=float, default=pc.dropout,
                       help="dropout rate in the gated layers, in training (0: none)")
    prior.add_argument("--prior-flip", default=None, action=argparse.BooleanOptionalAction,
                       help="also train the prior on the codes of horizontally mirrored training images (default: "
                            f"on for {' and '.join(MIRROR_INVARIANT)}, whose classes a mirror keeps; off otherwise)")
    prior.add_argument("--prior-channels", type=int, default=pc.channels, help="p: channels of each stack")
    prior.add_argument("--prior-layers", type=int, default=None,
                       help=f"L: gated layers (default: {PRIOR_LAYERS[1]} for one level, {PRIOR_LAYERS[2]} for two)")
    prior.add_argument("--prior-kernel", type=int, default=pc.kernel, help="k: odd kernel size")
    prior.add_argument("--prior-attention-every", type=int, default=None,
                       help="causal self-attention after every so many gated layers of the top-most prior "
                            "(default: 4 for two levels' top prior; for one level, --prior-layers: one attention "
                            "layer, after the last gated layer; 0 = none)")
    prior.add_argument("--prior-heads", type=int, default=pc.heads, help="attention heads")
    prior.add_argument("--prior-cond-blocks", type=int, default=None,
                       help="two levels: residual blocks over the top codes before the bottom prior reads them, so "
                            "that each bottom code sees the top codes around it, the later ones too (default: "
                            f"{COND_BLOCKS}; 0: only the top code above it)")
    prior.add_argument("--prior-labels", default=t.prior_labels, action=argparse.BooleanOptionalAction,
                       help="condition the prior on class labels where the data has them")
    prior.add_argument("--prior-label-dropout", type=float, default=None,
                       help="share of training grids whose class is dropped, so that the prior also learns them "
                            f"without it, for --guidance (default: {LABEL_DROPOUT} for a class-conditional prior)")
    add_sampling_flags(prior, t, "of the samples drawn at the end")
    ev = p.add_argument_group("evaluation (train.py evaluate, run at the end)")
    ev.add_argument("--evaluate", default=t.evaluate, action=argparse.BooleanOptionalAction,
                    help="measure the samples and reconstructions with a judge network at the end")
    ev.add_argument("--judge-steps", type=int, default=t.judge_steps, help="training steps of the judge")
    ev.add_argument("--eval-images", type=int, default=t.eval_images, help="held-out images measured, and as many samples")
    return p


MODEL_FLAGS = ("hidden", "res_hidden", "res_blocks", "levels", "code_stride", "top_only_rate", "codebook_size",
               "top_codebook_size", "code_dim", "beta", "quantizer", "ema_decay", "kmeans_init", "restart_threshold", "rvq_stages",
               "fsq_levels", "lfq_entropy_weight", "lfq_temperature", "gumbel_kl_weight", "gumbel_temperature",
               "gumbel_temperature_min", "gumbel_anneal_steps")
PRIOR_FLAGS = {"prior_channels": "channels", "prior_layers": "layers", "prior_kernel": "kernel",
               "prior_heads": "heads", "prior_attention_every": "attention_every", "prior_dropout": "dropout",
               "prior_label_dropout": "label_dropout", "prior_cond_blocks": "cond_blocks"}
MIRROR_INVARIANT = ("shapes", "shapes64", "cifar10")  # the built-in data a horizontal mirror keeps in its class (a triangle
                                          # stays apex up); not digits, nor clothes (a shoe points left)
RESUMABLE = {"steps", "prior_steps", "top_prior_factor", "stage", "log_every", "eval_every", "device", "temperature",
             "top_k", "top_p", "guidance", "resume", "evaluate",
             "judge_steps", "eval_images"}


def given_flags(parser, argv):
    """Destinations of the flags actually typed on the command line, in any spelling argparse
    takes ('-K64', '--lr=1', '--no-kmeans-init'): argv parsed again into a namespace of markers,
    of which argparse replaces just those of the flags it meets."""
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {dest for dest, value in vars(typed).items() if value is not unset}


def read_json(path, what):
    """A JSON object from a run folder, or a UserError that names the file and the problem."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # a folder, bytes, not JSON, too deep
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__}: {e})")
    if not isinstance(value, dict):
        raise UserError(f"{path}: unreadable {what} (expected a JSON object, got {type(value).__name__})")
    return value


def saved_configs(run):
    """(TrainConfig, vqvae.Config, PriorConfigs) of a run folder's config.json, each checked."""
    path = run / "config.json"
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder" + (" (no such folder)" if not run.exists() else ""))
    try:
        saved = read_json(path, "run config")
    except FileNotFoundError:
        raise UserError(f"{run}: not a run folder (no config.json)")
    try:
        if not (isinstance(saved.get("train"), dict) and isinstance(saved.get("model"), dict)
                and isinstance(saved.get("priors"), list) and all(isinstance(p, dict) for p in saved["priors"])):
            raise ValueError("expected objects 'train' and 'model' and a list of objects 'priors'")
        cfg, model_cfg = TrainConfig.from_dict(saved["train"]), vqvae.Config.from_dict(saved["model"])
        if len(saved["priors"]) != model_cfg.levels:
            raise ValueError(f"{len(saved['priors'])} prior configs for a model of {model_cfg.levels} level(s)")
        priors = [P.PriorConfig.from_dict(p) for p in saved["priors"]]
        if [p.codebook_size for p in priors] != model_cfg.level_num_codes:
            raise ValueError(f"the priors' codebook sizes {[p.codebook_size for p in priors]} differ from the "
                             f"model's codes per level {model_cfg.level_num_codes}")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: unreadable run config ({e})")
    return cfg, model_cfg, priors


def configs_from_args(parser, args, argv):
    """(TrainConfig, vqvae.Config, the priors' settings, run folder, resuming?) from the flags,
    or from a run folder's config.json when resuming (the settings are then the saved
    PriorConfigs, one per level). A ValueError names a bad setting."""
    given = given_flags(parser, argv)
    if args.resume:
        run = Path(args.resume)
        cfg, model_cfg, priors = saved_configs(run)
        old = {**asdict(cfg), **asdict(model_cfg), **{k: getattr(priors[0], v) for k, v in PRIOR_FLAGS.items()},
               "prior_cond_blocks": priors[-1].cond_blocks}               # a bottom prior's setting
        changed = sorted(d for d in given - RESUMABLE if getattr(args, d) != old.get(d))
        if changed:
            raise UserError(f"cannot change {', '.join('--' + d.replace('_', '-') for d in changed)} when resuming; "
                            f"only {', '.join('--' + d.replace('_', '-') for d in sorted(RESUMABLE - {'resume'}))} may")
        cfg = TrainConfig(**{**asdict(cfg), **{d: getattr(args, d) for d in given & (RESUMABLE - {"resume"})}})
        return cfg, model_cfg, priors, run, True
    if args.stage == "prior":
        raise UserError("--stage prior trains a prior for an existing run: add --resume RUN_DIR")
    if args.prior_flip is None:
        args.prior_flip = args.data in MIRROR_INVARIANT
    if args.prior_decay_steps == 0:                                     # fixed now: a resumed run keeps its schedule
        args.prior_decay_steps = args.prior_steps
    if args.prior_layers is None:
        args.prior_layers = PRIOR_LAYERS[args.levels]
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model_cfg = vqvae.Config(**{k: getattr(args, k) for k in MODEL_FLAGS}, seed=args.seed)
    settings = {v: getattr(args, k) for k, v in PRIOR_FLAGS.items()}
    run = Path(args.out or f"runs/{Path(cfg.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run / "checkpoint.npz").exists():
        raise UserError(f"{run} already holds a run; continue it with --resume {run}, or choose another --out")
    return cfg, model_cfg, settings, run, False


def prior_configs(settings, model_cfg, num_classes, seed):
    """One PriorConfig per level, coarsest first. The top-most prior attends to its whole past
    (PixelSNAIL's causal self-attention): by default after every 4th gated layer in VQ-VAE-2's
    top prior, and once, after the last gated layer, in a one-level prior (README, "The prior").
    A bottom prior is conditioned on the top codes, each of which covers 2 x 2 bottom positions,
    through residual blocks that let it see the top codes around its own (VQ-VAE-2's
    conditioning stack)."""
    attention, label_dropout = settings["attention_every"], settings.get("label_dropout")
    cond_blocks = settings.get("cond_blocks")
    if cond_blocks is not None and cond_blocks < 0:
        raise UserError(f"--prior-cond-blocks must be at least 0, got {cond_blocks}")
    if cond_blocks and model_cfg.levels == 1:
        raise UserError(f"--prior-cond-blocks {cond_blocks} sets the bottom prior of two levels: add --levels 2")
    if label_dropout is None:
        label_dropout = LABEL_DROPOUT if num_classes else 0.0
    elif label_dropout > 0 and not num_classes:
        raise UserError(f"--prior-label-dropout {label_dropout} drops the class of a class-conditional prior; this "
                        f"prior has no classes (--no-prior-labels, or data without labels)")
    K = model_cfg.level_num_codes                                      # coarsest first
    base = dict(channels=settings["channels"], layers=settings["layers"], kernel=settings["kernel"],
                heads=settings["heads"], dropout=settings["dropout"], label_dropout=label_dropout,
                num_classes=num_classes, dtype=model_cfg.dtype)
    if attention is None:
        attention = 4 if model_cfg.levels == 2 else settings["layers"]
    top = P.PriorConfig(**base, codebook_size=K[0], seed=seed, attention_every=attention)
    if model_cfg.levels == 1:
        return [top]
    return [top, P.PriorConfig(**base, codebook_size=K[1], seed=seed + 1, cond_codebook_size=K[0],
                               cond_channels=settings["channels"], cond_upsample=2,
                               cond_blocks=COND_BLOCKS if cond_blocks is None else cond_blocks)]


def prior_lr_at(cfg, step, scale=1):
    """The prior's learning rate at a step (from 0): up linearly from 0 to --prior-lr over
    --prior-warmup steps, then down linearly to a tenth of it at --prior-decay-steps, and a
    tenth after that (a run resumed with more --prior-steps trains on at that rate). Adam's
    first steps, with second moments estimated from a few batches, are the least reliable: the
    warm-up keeps them small. The decay ends training at a low rate, where the last steps
    average out the batch-to-batch noise instead of following it. A prior that trains `scale`
    times the steps (the top one, --top-prior-factor) has its warm-up and decay stretched alike."""
    peak, warmup = cfg.prior_lr, cfg.prior_warmup * scale
    end = (cfg.prior_decay_steps or cfg.prior_steps) * scale           # 0: a config.json from before the schedule
    if step < warmup:
        return peak * (step + 1) / warmup
    left = max(0.0, (end - step) / max(1, end - warmup))               # 1 at the peak, 0 from `end` on
    return peak * (0.1 + 0.9 * left)


def check_batch_sizes(cfg, n_train):
    for name in ("batch_size", "prior_batch_size"):
        if getattr(cfg, name) > n_train:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is larger than the {n_train} training images")


def read_summary(run):
    """A run's summary.json, with the figures that later commands compute with checked."""
    path = run / "summary.json"
    summary = read_json(path, "run summary")
    for key in ("vqvae_wall_time_s", "prior_wall_time_s"):
        if key in summary and not (isinstance(summary[key], (int, float)) and math.isfinite(summary[key])):
            raise UserError(f"{path}: {key} is {summary[key]!r}, not a number of seconds")
    hw = summary.get("image_hw")
    if hw is not None and not (isinstance(hw, list) and len(hw) == 2
                               and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise UserError(f"{path}: image_hw is {hw!r}, not a height and a width")
    return summary


def make_run_folder(run):
    if run.exists() and not run.is_dir():
        raise UserError(f"{run}: a file of that name is in the way of the run folder; choose another --out")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the run folder {run} ({e.strerror or e})")


def is_prior_figure(key):
    """The summary's figures that come from the priors and their samples."""
    return "prior" in key or key in ("sample_time_s", "samples")


def train(argv):
    # -- config: every setting is checked here, before anything is read or trained
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, model_cfg, prior_settings, run, resuming = configs_from_args(parser, args, argv)
    except ValueError as e:                                            # TrainConfig, vqvae.Config validation
        raise UserError(str(e))

    if model_cfg.quantizer == "rvq" and model_cfg.levels == 2 and cfg.stage != "vqvae":
        raise UserError("the priors do not model two levels of residual codes (the bottom prior's conditioning "
                        "assumes one code per position): use --levels 1 with --quantizer rvq, or --stage vqvae")
    if cfg.top_prior_factor != 1 and model_cfg.levels != 2:
        raise UserError(f"--top-prior-factor {cfg.top_prior_factor} sets the top prior of two levels: add --levels 2")

    # -- data
    data = load_dataset(cfg.data, cfg.data_dir)
    real_hw = data["train"].shape[1:3]
    if data["train"].shape[3] != model_cfg.in_channels:
        if resuming:
            raise UserError(f"{cfg.data} has {data['train'].shape[3]} channels, the run's model expects {model_cfg.in_channels}")
        model_cfg.in_channels = data["train"].shape[3]
    train_images = pad_to_multiple(data["train"], model_cfg.downsample)
    test_images = pad_to_multiple(data["test"], model_cfg.downsample)
    check_batch_sizes(cfg, len(train_images))
    has_labels = data.get("num_classes", 0) > 0 and "train_labels" in data
    try:
        prior_cfgs = prior_settings if resuming else prior_configs(
            prior_settings, model_cfg, data["num_classes"] if cfg.prior_labels and has_labels else 0, cfg.seed)
    except ValueError as e:                                            # PriorConfig validation
        raise UserError(str(e))
    num_classes = prior_cfgs[0].num_classes
    if num_classes and not has_labels:
        raise UserError(f"the run's prior is class-conditional, but {cfg.data} has no labels")
    for split in ("train_labels", "test_labels"):
        if num_classes and not (data[split].min() >= 0 and data[split].max() < num_classes):
            raise UserError(f"{cfg.data}: {split} lie in [{data[split].min()}, {data[split].max()}], outside the "
                            f"prior's {num_classes} classes")
    rule = sampling_rule(cfg, prior_cfgs)                              # how the samples at the end are drawn

    # -- models, optimisers, run folder
    model = vqvae.VQVAE(model_cfg, device=cfg.device)
    opt = vqvae.Adam(model.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    xp, device = model.xp, "gpu" if model.xp is not np else "cpu"
    gan = disc = disc_opt = None
    if cfg.adversarial:                                                # a stream of its own: the VQ-VAE starts as without
        init = vqvae.uniform_init(np.random.default_rng([cfg.seed, 1]), xp, model_cfg.dtype)
        disc = vqvae.PatchDiscriminator(model_cfg.in_channels, cfg.disc_width, cfg.disc_layers, init=init)
        if min(disc.patches(*train_images.shape[1:3])) < 1:
            raise UserError(f"--disc-layers {cfg.disc_layers} leaves no patch of a {train_images.shape[1]} x "
                            f"{train_images.shape[2]} image to judge: give fewer")
        disc_opt = vqvae.Adam(disc.params, lr=cfg.disc_lr, betas=DISC_BETAS)
        gan = vqvae.VQGAN(model, disc, cfg.disc_weight, cfg.disc_start)
    make_run_folder(run)
    step, wall, summary_before = 0, 0.0, {}
    if resuming:
        step, wall, _ = load_checkpoint(run / "checkpoint.npz", model, opt, disc, disc_opt)
        if cfg.steps < step:
            raise UserError(f"the VQ-VAE of {run} is at step {step}: --steps {cfg.steps} would go back; "
                            f"give --steps {step} or more")
        if (run / "summary.json").exists():
            summary_before = read_summary(run)
    if cfg.stage == "prior" and step < cfg.steps:
        raise UserError(f"the VQ-VAE of {run} stopped at step {step} of {cfg.steps}: finish it first "
                        f"(--resume {run} --stage vqvae)")
    vqvae_trains = cfg.stage in ("vqvae", "all") and step < cfg.steps

    # -- the priors already saved, read now: a broken file stops the run before any training, and
    #    a prior fitted to the codes of another state of the VQ-VAE is trained anew, never continued
    def new_prior(prior_cfg):
        prior = P.PixelCNN(prior_cfg, device=cfg.device)
        return prior, vqvae.Adam(prior.params, lr=cfg.prior_lr)

    current = None if vqvae_trains else fingerprint(model)
    levels, stale = [], []                                 # (name, prior, its Adam, step, steps factor, seconds)
    for name, prior_cfg in zip(level_names(model), prior_cfgs):
        name += "prior"                                                # 'top_prior', 'prior'
        scale = cfg.top_prior_factor if name == "top_prior" else 1     # the top prior may train longer
        prior, prior_opt = new_prior(prior_cfg)
        start, wall_before = 0, 0.0
        if resuming and (run / f"{name}.npz").exists():
            start, wall_before, notes = load_checkpoint(run / f"{name}.npz", prior, prior_opt)
            fitted_to = notes.get("vqvae_sha256")                      # absent in priors saved before it was kept
            if vqvae_trains or fitted_to not in (None, current) or (fitted_to is None and "stale_priors" in summary_before):
                stale.append(f"{name}.npz")
                (prior, prior_opt), start, wall_before = new_prior(prior_cfg), 0, 0.0
            elif start > cfg.prior_steps * scale:
                times = f" x {scale} (--top-prior-factor)" if scale > 1 else ""
                raise UserError(f"{run / name}.npz is at step {start}: --prior-steps {cfg.prior_steps}{times} would go "
                                f"back; give --prior-steps {math.ceil(start / scale)} or more")
        levels.append((name, prior, prior_opt, start, scale, wall_before))
    if stale and cfg.stage == "vqvae":
        stale_note = (f"{' and '.join(stale)} and samples.png come from the codes of an earlier state of the VQ-VAE; "
                      f"train the priors anew with: python train.py --resume {run} --stage prior")
    elif stale:
        stale_note = f"{' and '.join(stale)} came from the codes of an earlier state of the VQ-VAE: trained anew"
    if stale:
        print(f"{run}: {stale_note}", file=sys.stderr)

    config = {"train": asdict(cfg), "model": asdict(model_cfg), "priors": [asdict(c) for c in prior_cfgs]}
    atomic_write(run / "config.json", json.dumps(config, indent=2).encode())
    print(f"{run}: {cfg.data} {train_images.shape[1:]} ({len(train_images)} train, {len(test_images)} held out), "
          f"VQ-VAE with {sum(p.size for p in model.params.values()):,} parameters, device {device}"
          + (f", resuming at step {step}" if resuming else ""), file=sys.stderr)

    progress = Progress()
    summary = {"data": cfg.data, "image_hw": list(real_hw), "device": device, "quantizer": model_cfg.quantizer,
               "levels": model_cfg.levels, "adversarial": cfg.adversarial}
    t_start = time.time()
    with open(run / "metrics.jsonl", "a") as metrics, CtrlC() as stop:
        def log(record, text, final):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            progress.show(text, final)
            if final:                                                  # a held-out evaluation: new points
                write_report(run)

        # -- stage 1: the VQ-VAE
        if cfg.stage in ("vqvae", "all"):
            def vqvae_step(s):
                idx = batch_indices(cfg.seed, s, len(train_images), cfg.batch_size)
                if gan is not None:                                    # VQGAN: the discriminator from step disc_start
                    return gan.train_step(to_model(train_images[idx]), opt, disc_opt, s)
                return model.train_step(to_model(train_images[idx]), opt)

            def vqvae_eval(s):
                write_png(run / f"recon_{s:06d}.png", recon_grid(model, test_images, real_hw))
                return evaluate(model, test_images, real_hw, cfg.batch_size)

            def vqvae_save(s):
                return save_checkpoint(run / "checkpoint.npz", model, opt, s, wall + time.time() - t_start, disc, disc_opt)

            ev = fit("vqvae", vqvae_step, vqvae_eval, vqvae_save, step, cfg.steps, cfg.batch_size, cfg, xp, log, stop,
                     run / "checkpoint.npz")
            wall += time.time() - t_start
        else:
            ev = evaluate(model, test_images, real_hw, cfg.batch_size)
        write_png(run / "recon.png", recon_grid(model, test_images, real_hw))
        if model_cfg.levels == 2:                                      # what the top level carries by itself
            write_png(run / "recon_top.png", recon_grid(model, test_images, real_hw, top_only=True))
        summary.update(ev, steps=cfg.steps, vqvae_wall_time_s=wall)

        # -- stage 2: a PixelCNN prior over each level's codes (the bottom one given the top codes), then samples
        if cfg.stage in ("prior", "all"):
            vqvae_sha256 = fingerprint(model)                          # recorded in each prior's checkpoint
            print(f"encoding {len(train_images) * (1 + cfg.prior_flip) + len(test_images)} images to codes"
                  + (" (the training images also mirrored)" if cfg.prior_flip else ""), file=sys.stderr)
            codes_train, labels_train = prior_training_set(model, train_images, data["train_labels"] if num_classes
                                                           else None, cfg.prior_flip)
            codes_test = tuple(map(prior_grid, encode_all(model, test_images)))
            labels_test = data["test_labels"] if num_classes else None
            priors, prior_wall = [], 0.0
            for level, (name, prior, prior_opt, start, scale, wall_before) in enumerate(levels):
                codes, cond = codes_train[level], codes_train[level - 1] if level else None
                t_prior = time.time()

                def prior_train_step(s):
                    prior_opt.lr = prior_lr_at(cfg, s, scale)
                    idx = batch_indices(cfg.seed + 1 + level, s, len(codes), cfg.prior_batch_size)
                    return prior.train_step(codes[idx], prior_opt, None if labels_train is None else labels_train[idx],
                                            cond_codes=None if cond is None else cond[idx])

                def prior_eval(s):
                    return evaluate_prior(prior, codes_test[level], labels_test, codes_test[level - 1] if level else None,
                                          cfg.prior_batch_size, name)

                def prior_save(s):
                    return save_checkpoint(run / f"{name}.npz", prior, prior_opt, s, wall_before + time.time() - t_prior,
                                           vqvae_sha256=vqvae_sha256)

                prior_ev = fit(name, prior_train_step, prior_eval, prior_save, start, cfg.prior_steps * scale,
                               cfg.prior_batch_size, cfg, xp, log, stop, run / f"{name}.npz")
                summary.update(prior_ev, **{f"{name}_steps": cfg.prior_steps * scale})
                prior_wall += wall_before + time.time() - t_prior
                priors.append(prior)
            rows = num_classes or 4
            grid, _, seconds = draw_samples(model, priors, rows, 8, cfg.seed, rule, real_hw)
            write_png(run / "samples.png", grid)
            summary.update(prior_wall_time_s=prior_wall, sample_time_s=seconds, samples=rows * 8)

    summary = {**summary_before, **summary}                            # a later stage adds to an earlier one
    if stale and cfg.stage == "vqvae":                                 # figures of priors that no longer apply
        summary = {k: v for k, v in summary.items() if not is_prior_figure(k)}
        summary["stale_priors"] = stale_note
    elif cfg.stage != "vqvae":
        summary.pop("stale_priors", None)
    summary["wall_time_s"] = summary["vqvae_wall_time_s"] + summary.get("prior_wall_time_s", 0.0)  # both stages' training
    atomic_write(run / "summary.json", json.dumps(summary, indent=2).encode())

    # -- the evaluation: a judge trained on the real training images measures the samples
    if cfg.evaluate and cfg.stage != "vqvae":
        print(f"evaluating: a judge network trained on the {len(data['train'])} training images measures "
              f"{min(cfg.eval_images, len(data['test']))} held-out images, their reconstructions and as many samples",
              file=sys.stderr)
        ev = evaluate_samples(run, model, priors, data, real_hw, 0, cfg.judge_steps, cfg.eval_images, cfg.seed + 1,
                              rule, cfg.device)
        atomic_write(run / "evaluation.json", json.dumps(ev, indent=2).encode())
        print(evaluation_table(ev), file=sys.stderr)
        summary.update({k: v for k, v in ev.items() if k.startswith(("fd_", "accuracy_", "precision_", "recall_"))},
                       evaluate_time_s=ev["evaluate_time_s"])
        atomic_write(run / "summary.json", json.dumps(summary, indent=2).encode())
    write_report(run)
    print(f"done: {run}/report.html, summary.json, recon.png" + (", samples.png" if "sample_time_s" in summary else "")
          + (", evaluation.json" if cfg.evaluate and cfg.stage != "vqvae" else ""), file=sys.stderr)
    return 0


def encode(argv):
    """Write the integer codes of a dataset split with a trained model: the tokenizer."""
    p = ArgumentParser(prog="train.py encode", description="Encode a dataset to integer codes.")
    p.add_argument("--run", required=True, help="run folder holding checkpoint.npz")
    p.add_argument("--data", required=True, help="as for training")
    p.add_argument("--data-dir", default="data", help="as for training")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to encode")
    p.add_argument("--out", required=True, help="output .npy of codes (N, h, w), residual VQ's (N, S, h, w); "
                                                 "for two levels an .npz with arrays 'top' and 'bottom'")
    p.add_argument("--device", default="auto", choices=DEVICES, help="gpu needs CuPy")
    args = p.parse_args(argv)
    model = load_model(Path(args.run) / "checkpoint.npz", vqvae.VQVAE, args.device)
    check_output(args.out, "--out", ".npy" if model.cfg.levels == 1 else ".npz")   # before the data is read
    images = load_dataset(args.data, args.data_dir)[args.split]
    if images.shape[3] != model.cfg.in_channels:
        raise UserError(f"{args.data} has {images.shape[3]} channels, the model expects {model.cfg.in_channels}")
    dtype = np.int16 if max(model.cfg.level_num_codes) <= 2**15 else np.int32
    codes = [c.astype(dtype) for c in encode_all(model, pad_to_multiple(images, model.downsample))]
    if model.cfg.levels == 1:
        save_npy(args.out, codes[0])
    else:
        save_npz(args.out, {"top": codes[0], "bottom": codes[1]})
    print(f"wrote {args.out}: codes {' and '.join(f'{c.shape} in [0, {K})' for c, K in zip(codes, model.cfg.level_num_codes))}",
          file=sys.stderr)
    return 0


def load_trained(run, device, need_priors=True):
    """A finished run's VQ-VAE, its priors (each checked to be fitted to this VQ-VAE's codes)
    and the image size -> (model, priors or None, (h, w))."""
    model = load_model(run / "checkpoint.npz", vqvae.VQVAE, device)
    summary = read_summary(run) if (run / "summary.json").is_file() else {}
    if "image_hw" not in summary:
        raise UserError(f"{run}: no summary.json with the image size; finish the run first")
    real_hw = tuple(summary["image_hw"])
    vqvae_sha256 = fingerprint(model)
    priors = []
    for name in level_names(model):
        path = run / f"{name}prior.npz"
        if not path.is_file():
            if not need_priors:
                return model, None, real_hw
            raise UserError(f"{run} has no {path.name} yet: train it with python train.py --resume {run} --stage prior")
        priors.append(load_model(path, P.PixelCNN, device))
        fitted_to = checkpoint_note(path, "vqvae_sha256")
        if fitted_to not in (None, vqvae_sha256) or (fitted_to is None and "stale_priors" in summary):
            raise UserError(f"{path} was fitted to the codes of an earlier state of the VQ-VAE in {run}/checkpoint.npz; "
                            f"train it anew with: python train.py --resume {run} --stage prior")
    K = model.cfg.level_num_codes
    if [p.cfg.codebook_size for p in priors] != K or (len(priors) == 2 and priors[1].cfg.cond_codebook_size != K[0]):
        raise UserError(f"{run}: the priors do not model the codes of this VQ-VAE ({' and '.join(map(str, K))} per level)")
    return model, priors, real_hw


def check_output(path, flag, suffix=None):
    """A file to be written later: its folder must exist now, the name must not be a folder, and it
    ends in the suffix of what will be written (a PNG named .jpg, or an .npz named .npy, would be
    read back wrong)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    if suffix and path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: this writes {suffix[1:].upper()} data: give a name ending in {suffix}")


def sample(argv):
    """Draw new images from a finished run: codes from the prior, decoded by the VQ-VAE."""
    p = ArgumentParser(prog="train.py sample", description="Sample new images from a trained run.")
    p.add_argument("--run", required=True, help="run folder holding checkpoint.npz and the priors")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/samples_seed<seed>.png)")
    p.add_argument("--codes-out", default=None, help="also write the sampled codes to this .npz (one array a level)")
    p.add_argument("--per-row", type=int, default=8, help="samples per row (one row per class if conditional)")
    p.add_argument("--rows", type=int, default=4, help="rows, for an unconditional prior")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    add_sampling_flags(p, TrainConfig(), "below 1: safer samples; 0: argmax")
    p.add_argument("--device", default="auto", choices=DEVICES, help="gpu needs CuPy")
    args = p.parse_args(argv)
    if args.per_row < 1 or args.rows < 1:
        raise UserError(f"--per-row and --rows must be at least 1, got {args.per_row} and {args.rows}")
    sampling_rule(args, [])                                            # the numbers, before anything is read
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    run = Path(args.run)
    for flag, path, suffix in (("--out", args.out, ".png"), ("--codes-out", args.codes_out, ".npz")):
        check_output(path, flag, suffix)
    model, priors, real_hw = load_trained(run, args.device)
    rule = sampling_rule(args, [p.cfg for p in priors])
    rows = priors[0].cfg.num_classes or args.rows
    grid, codes, seconds = draw_samples(model, priors, rows, args.per_row, args.seed, rule, real_hw)
    out = Path(args.out or run / f"samples_seed{args.seed}.png")
    write_png(out, grid)
    if args.codes_out:
        save_npz(args.codes_out, {f"{name}codes": c for name, c in zip(level_names(model), codes)})
    print(f"wrote {out}: {len(codes[0])} samples, codes sampled in {seconds:.2f}s", file=sys.stderr)
    return 0


def evaluate_command(argv):
    """Measure a finished run: its judge (trained once on the run's training split, then kept
    in the run folder), held-out images, their reconstructions and new samples."""
    p = ArgumentParser(prog="train.py evaluate", description="Measure a run's reconstructions and samples with a "
                                                               "judge network trained on the real training images.")
    p.add_argument("--run", required=True, help="run folder of a finished run")
    p.add_argument("--judge-seed", type=int, default=0, help="seed of the judge (its initialisation and batches)")
    p.add_argument("--judge-steps", type=int, default=TrainConfig.judge_steps, help="the judge's training steps")
    p.add_argument("--images", type=int, default=TrainConfig.eval_images,
                   help="held-out images measured, and as many samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    add_sampling_flags(p, TrainConfig(), "of the samples")
    p.add_argument("--device", default="auto", choices=DEVICES, help="gpu needs CuPy")
    args = p.parse_args(argv)
    for flag, v, low in (("--judge-seed", args.judge_seed, 0), ("--judge-steps", args.judge_steps, 1),
                         ("--images", args.images, 2), ("--seed", args.seed, 0)):
        if v < low:
            raise UserError(f"{flag} must be at least {low}, got {v}")
    sampling_rule(args, [])                                            # the numbers, before anything is read
    run = Path(args.run)
    cfg, _, _ = saved_configs(run)
    model, priors, real_hw = load_trained(run, args.device, need_priors=False)
    rule = sampling_rule(args, [p.cfg for p in priors or []])
    data = load_dataset(cfg.data, cfg.data_dir)
    ev = evaluate_samples(run, model, priors, data, real_hw, args.judge_seed, args.judge_steps, args.images,
                          args.seed, rule, args.device)
    atomic_write(run / "evaluation.json", json.dumps(ev, indent=2).encode())
    write_report(run)
    print(evaluation_table(ev))
    print(f"wrote {run / 'evaluation.json'} and report.html", file=sys.stderr)
    return 0


def report_command(argv):
    """(Re)write RUN/report.html from whatever the run folder holds, for runs of any age."""
    p = ArgumentParser(prog="train.py report", description="Write a run folder's report.html: curves, pictures, figures.")
    p.add_argument("--run", required=True, help="run folder")
    run = Path(p.parse_args(argv).run)
    if not (run / "metrics.jsonl").is_file() and not (run / "config.json").is_file():
        raise UserError(f"{run}: not a run folder (no metrics.jsonl or config.json)")
    write_report(run)
    print(f"wrote {run / 'report.html'}", file=sys.stderr)
    return 0


COMMANDS = {"encode": encode, "sample": sample, "evaluate": evaluate_command, "report": report_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS.get(argv[0], train) if argv else train
    if command is not train:
        argv = argv[1:]
    try:
        return command(argv)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:                                          # before a stage's loop, or a second Ctrl-C
        print("\ntrain.py: interrupted", file=sys.stderr)
        return 130
    except (UserError, vqvae.DeviceError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:                                               # a file or folder the checks above did not foresee
        print(f"train.py: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"train.py: error: out of memory ({e or 'no details'}); try a smaller --batch-size or model",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
