"""The data: uint8 images (N, H, W, C), or speech, a training split and a held-out one, and their classes.

    shapes, shapes64     built-in scenes of circles, squares and triangles, generated from a seed
    mnist, fashion-mnist IDX files, gzipped or not, downloaded with their SHA-256 checked
    cifar10              the binary version, a folder of .bin files or its .tar.gz
    PATH.npy, PATH.npz   uint8 images in any common layout, optionally with labels
    fsdd                 spoken digits: 8 kHz mono 16-bit WAV files, downloaded with each one's SHA-256 checked

load_dataset(name, data_dir) -> {"train", "test", "num_classes"[, "train_labels", "test_labels"]}; for
speech (AUDIO) "train" and "test" are lists of float32 waveforms in [-1, 1) (see fsdd_dataset).
The model sees to_model(images) = (images / 255 - 0.5) / PIXEL_STD. Every damaged or wrong file
gives one runs.UserError that names it.
"""
import functools
import gzip
import hashlib
import io
import math
import os
import re
import struct
import sys
import tarfile
import urllib.request
import wave
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

import vqvae
from runs import READ_ERRORS, UserError, atomic_write, unreadable


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


def fetch(url, instead):
    """The bytes at url, or one line saying that the download failed and what to do `instead`."""
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); are you offline? {instead}")


def download(dataset, name, folder):
    """Fetch one file over HTTPS into `folder`, verify its SHA-256, then move it into place."""
    base, files = DOWNLOADS[dataset]
    url, dest = base + name, Path(folder) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = fetch(url, f"Put {name} into {folder} yourself and run again")
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
AUDIO = ("fsdd",)  # the data that are speech: lists of waveforms, not arrays of images


def load_dataset(name, data_dir):
    if name in SHAPES:
        return shapes_dataset(SHAPES[name])
    if name in ("mnist", "fashion-mnist", "cifar10", "fsdd") and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir}: not a folder")
    if name in ("mnist", "fashion-mnist"):
        return mnist_dataset(name, data_dir)
    if name == "cifar10":
        return cifar10_dataset(data_dir)
    if name == "fsdd":
        return fsdd_dataset(data_dir)
    if name.endswith((".npy", ".npz")):
        return array_file_dataset(name)
    raise UserError(f"unknown dataset {name!r}: use shapes, shapes64, mnist, fashion-mnist, cifar10, fsdd, "
                    f"or a .npy/.npz file")


# -----------------------------------------------------------------------------
# speech: the Free Spoken Digit Dataset's WAV recordings


def read_wav(path, rate=8000):
    """A mono 16-bit PCM WAV file of `rate` samples a second -> int16 (T,). Any other file (stereo,
    8-bit, another rate, no samples, cut short, not a WAV) is one UserError that names it and says
    what is wrong: the codec's frame rate and its scale both assume this one format."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, file_rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, *READ_ERRORS) as e:
        raise unreadable(path, "not a readable WAV file", e)
    if channels != 1:
        raise UserError(f"{path}: {channels} channels; expected mono (1 channel)")
    if width != 2:
        raise UserError(f"{path}: {8 * width}-bit samples; expected 16-bit PCM")
    if file_rate != rate:
        raise UserError(f"{path}: sampled at {file_rate} Hz; expected {rate} Hz")
    if n == 0:
        raise UserError(f"{path}: no samples (an empty recording)")
    if len(frames) != n * channels * width:
        raise UserError(f"{path}: truncated: {len(frames)} bytes of samples where the header promises {n * width}")
    return np.frombuffer(frames, "<i2").astype(np.int16)             # WAV is little-endian


def write_wav(path, samples, rate=8000):
    """int16 samples, or floats in [-1, 1] (clipped, then scaled by the 32768 that fsdd_dataset
    divides by, so a waveform read and written again is the same file) -> a mono 16-bit PCM WAV,
    written whole or not at all (runs.atomic_write)."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"write_wav: expected mono samples of shape (T,), got {samples.shape}")
    if samples.dtype != np.int16:
        samples = np.clip(np.round(samples.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    atomic_write(path, buf.getvalue())


FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"
FSDD_CHECKSUMS = Path(__file__).parent / "checksums" / "fsdd-v1.0.10.sha256"  # the release's 3,000 recordings
FSDD_NAME = re.compile(r"([0-9])_([^_]+)_([0-9]+)\.wav")             # {digit}_{speaker}_{index}.wav
FSDD_TEST = 5                                                          # the dataset's own split: index 0-4 is test
FSDD_RATE = 8000


def fsdd_recordings(folder):
    """The recordings in `folder` as (name, digit, speaker, index), sorted by digit, speaker and
    index so that every machine sees one order. Other files (a README, .DS_Store) are ignored."""
    try:
        names = os.listdir(folder) if Path(folder).is_dir() else []
    except OSError as e:
        raise UserError(f"{folder}: cannot list the folder ({e.strerror or e})")
    found = []
    for name in names:
        m = FSDD_NAME.fullmatch(name)
        if m:
            found.append((name, int(m[1]), m[2], int(m[3])))
    return sorted(found, key=lambda r: r[1:])


def fsdd_checksums():
    """name -> SHA-256 of each recording of the release, from checksums/ in sha256sum's format:
    kept with the code, so a download is checked against the files this code was written for."""
    try:
        lines = FSDD_CHECKSUMS.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the list of SHA-256 digests {FSDD_CHECKSUMS} ({e.strerror or e})")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def download_fsdd(folder):
    """Fetch the release archive and write its recordings/*.wav into `folder`, each by its base name
    only (no member can write elsewhere), after checking every one's SHA-256 and that none is missing."""
    archive = fetch(FSDD_URL, f"Put the recordings ({{digit}}_{{speaker}}_{{index}}.wav) into {folder} "
                              f"yourself, or give --data-dir the folder that holds them")
    recordings = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isfile() and path.parent.name == "recordings" and FSDD_NAME.fullmatch(path.name):
                    recordings[path.name] = tar.extractfile(member).read()
    except (tarfile.TarError, *READ_ERRORS) as e:
        raise unreadable(FSDD_URL, "not a readable .tar.gz archive", e)
    expected = fsdd_checksums()
    for name, data in recordings.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected.get(name):
            raise UserError(f"{FSDD_URL}: {name} has SHA-256 {digest}, but {FSDD_CHECKSUMS.name} lists "
                            f"{expected.get(name, 'no file of that name')}")
    missing = sorted(expected.keys() - recordings.keys())
    if missing:
        raise UserError(f"{FSDD_URL}: the archive lacks {len(missing)} of the {len(expected)} recordings "
                        f"that {FSDD_CHECKSUMS.name} lists, e.g. {missing[0]}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in recordings.items():
            (folder / f"{name}.part").write_bytes(data)
            os.replace(folder / f"{name}.part", folder / name)
    except OSError as e:                                               # a full disk: take back every file, so
        for name in recordings:                                        # that no partial dataset is found later
            (folder / name).unlink(missing_ok=True)
            (folder / f"{name}.part").unlink(missing_ok=True)
        raise UserError(f"cannot write the recordings into {folder} ({e.strerror or e})")


def fsdd_dataset(data_dir):
    """The Free Spoken Digit Dataset, split as its authors split it (index 0-4 of each digit and
    speaker held out): {"train", "test": lists of float32 waveforms in [-1, 1), sorted by digit,
    speaker and index; "train_labels", "test_labels": the digits, int64; "train_speakers",
    "test_speakers": indices into "speakers", int64; "speakers": the names, sorted; "names_train",
    "names_test": the files' names; "num_classes": 10; "sample_rate": 8000}.

    The recordings are looked for in data_dir/fsdd/recordings, data_dir/recordings (a clone of the
    dataset's repository), data_dir/fsdd and data_dir; when none holds any, they are downloaded
    into the first. Files found on disk are read, not checked against the digests: a user's own
    recordings named this way are welcome."""
    data_dir = Path(data_dir)
    folders = [data_dir / "fsdd" / "recordings", data_dir / "recordings", data_dir / "fsdd", data_dir]
    folder = next((f for f in folders if fsdd_recordings(f)), None)
    if folder is None:
        folder = folders[0]
        download_fsdd(folder)
    recordings = fsdd_recordings(folder)
    speakers = sorted({speaker for _, _, speaker, _ in recordings})
    data = {key: [] for key in ("train", "test", "train_labels", "test_labels", "train_speakers", "test_speakers",
                                "names_train", "names_test")}
    for name, digit, speaker, index in recordings:
        split = "test" if index < FSDD_TEST else "train"
        data[split].append(read_wav(folder / name, FSDD_RATE).astype(np.float32) / 32768)   # int16 -> [-1, 1)
        data[f"{split}_labels"].append(digit)
        data[f"{split}_speakers"].append(speakers.index(speaker))
        data[f"names_{split}"].append(name)
    if not data["train"] or not data["test"]:
        raise UserError(f"{folder}: of {len(recordings)} recordings, {len(data['train'])} are for training (index "
                        f"{FSDD_TEST} and up) and {len(data['test'])} for testing (index 0 to {FSDD_TEST - 1}): "
                        f"need at least one of each")
    for key in ("train_labels", "test_labels", "train_speakers", "test_speakers"):
        data[key] = np.array(data[key], np.int64)
    return dict(data, speakers=speakers, num_classes=10, sample_rate=FSDD_RATE)


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
