"""The data: uint8 images (N, H, W, C), a training split and a held-out one, and their classes.

    shapes, shapes64     built-in scenes of circles, squares and triangles, generated from a seed
    mnist, fashion-mnist IDX files, gzipped or not, downloaded with their SHA-256 checked
    cifar10              the binary version, a folder of .bin files or its .tar.gz
    PATH.npy, PATH.npz   uint8 images in any common layout, optionally with labels

load_dataset(name, data_dir) -> {"train", "test", "num_classes"[, "train_labels", "test_labels"]}.
The model sees to_model(images) = (images / 255 - 0.5) / PIXEL_STD. Every damaged or wrong file
gives one runs.UserError that names it.
"""
import functools
import gzip
import hashlib
import math
import os
import struct
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

import vqvae
from runs import READ_ERRORS, UserError, unreadable


# -----------------------------------------------------------------------------
# the built-in scenes


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


# -----------------------------------------------------------------------------
# files: MNIST's IDX, CIFAR-10's records, NumPy arrays; downloads checked by SHA-256


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
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})")
    magic = b"\x93NUMPY" if path.suffix == ".npy" else b"PK"          # .npz: a zip
    if not head.startswith(magic):
        raise UserError(f"{path}: not a NumPy {path.suffix} file (it starts with {head!r}, not {magic!r})")
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
                    unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
                    if unseen:
                        raise UserError(f"{path}: test_labels hold classes {unseen[:5]} that train_labels do not: "
                                        f"the two splits must number the same classes")
                    num_classes = int(y_train.max()) + 1
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
MIRROR_INVARIANT = ("shapes", "shapes64", "cifar10")  # the data a horizontal mirror keeps in its class (a triangle
                                                      # stays apex up); not digits, nor clothes (a shoe points left)


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


# -----------------------------------------------------------------------------
# what the model sees: padded images on its scale, batches a function of the step


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
