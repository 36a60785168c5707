"""datasets.py: every loader on small files written here, in each exact format, and on damaged
bytes; the built-in scenes; the batches."""
import gzip
import hashlib
import io
import json
import tarfile
import wave

import numpy as np
import pytest
from hypothesis import given, strategies as st

import datasets as D
import prior as P
import runs as R
import train as T
from conftest import (seeds, TINY, idx_bytes, write_mnist, mutate, damage)


# -----------------------------------------------------------------------------
# loaders, on small files written here in each exact format

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_load_gzipped_or_not(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    data = D.load_dataset("mnist", tmp_path)
    assert data["train"].shape == (6, 28, 28, 1) and data["train"].dtype == np.uint8
    np.testing.assert_array_equal(data["train"][..., 0], arrays["train"][0])
    np.testing.assert_array_equal(data["test"][..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(data["test_labels"], arrays["t10k"][1])


def test_idx_reader_rejects_bad_magic_truncation_and_damaged_gzip(tmp_path):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    cases = {"magic.idx": (b"\x00\x00\x0d\x03" + good[4:], "bad magic number 00000d03"),
             "short.idx": (good[:-5], "truncated or padded IDX file: 59 bytes, expected 64"),
             "header.idx": (good[:9], "truncated IDX header"),
             "empty.idx": (b"", r"bad magic number \(empty file\)"),
             "cut.gz": (gzip.compress(good)[:-10], "damaged or truncated gzip")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(R.UserError, match=message):
            D.read_idx(tmp_path / name)


def test_missing_dataset_file_downloads_and_checks_sha256(tmp_path, monkeypatch):
    payload = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    urls = []
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: urls.append(url) or Response(payload))
    with pytest.raises(R.UserError, match="SHA-256 .* does not match"):
        D.find_or_download("mnist", "t10k-images-idx3-ubyte.gz", tmp_path)
    assert not (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").exists()      # nothing unverified is kept
    files = dict(D.MNIST_FILES, **{"t10k-images-idx3-ubyte.gz": __import__("hashlib").sha256(payload).hexdigest()})
    monkeypatch.setitem(D.DOWNLOADS, "mnist", (D.DOWNLOADS["mnist"][0], files))
    path = D.find_or_download("mnist", "t10k-images-idx3-ubyte.gz", tmp_path)
    assert path.read_bytes() == payload and urls[-1].startswith("https://")


def test_offline_download_gives_a_clear_message(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise D.urllib.error.URLError("no route to host")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(R.UserError, match="are you offline.*fashion-mnist"):
        D.load_dataset("fashion-mnist", tmp_path)


def cifar_records(labels, rng):
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, np.uint8)[:, None], images.reshape(len(labels), -1)], 1)
    return records.tobytes(), images.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_binary_records_from_folder_or_tarball(tmp_path, packed):
    rng = np.random.default_rng(0)
    blobs, expected = {}, {}
    for i, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        blobs[name], expected[name] = cifar_records([i % 10, (i + 3) % 10], rng)
    if packed:
        (tmp_path / "cifar10").mkdir()
        with tarfile.open(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", "w:gz") as tar:
            for name, data in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        folder = tmp_path / "cifar-10-batches-bin"
        folder.mkdir()
        for name, data in blobs.items():
            (folder / name).write_bytes(data)
    data = D.load_dataset("cifar10", tmp_path)
    assert data["train"].shape == (10, 32, 32, 3) and data["test"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(data["train"][:2], expected["data_batch_1.bin"])  # R, G, B planes -> HWC
    np.testing.assert_array_equal(data["test"], expected["test_batch.bin"])
    np.testing.assert_array_equal(data["test_labels"], [5, 8])


def test_cifar10_record_channel_order_is_red_green_blue():
    record = bytes([7]) + bytes([10]) * 1024 + bytes([20]) * 1024 + bytes([30]) * 1024
    images, labels = D.parse_cifar_batch(record, "one.bin")
    assert labels.tolist() == [7] and images[0, 5, 9].tolist() == [10, 20, 30]


def test_cifar10_truncated_batch_is_rejected():
    with pytest.raises(R.UserError, match="not a whole number of 3073-byte CIFAR-10 records"):
        D.parse_cifar_batch(bytes(3073 * 2 - 100), "data_batch_1.bin")


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npy_images_in_every_layout(tmp_path, layout):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (20, 12, 8, 1 if layout == "NHW" else 3), dtype=np.uint8)
    stored = {"NHW": nhwc[..., 0], "NHWC": nhwc, "NCHW": nhwc.transpose(0, 3, 1, 2)}[layout]
    np.save(tmp_path / "x.npy", stored)
    data = D.load_dataset(str(tmp_path / "x.npy"), tmp_path)
    np.testing.assert_array_equal(np.concatenate([data["train"], data["test"]]), nhwc)
    assert len(data["test"]) == 2                                      # the last 10 % held out


def test_npz_with_train_and_test_arrays(tmp_path):
    train, test = np.zeros((5, 8, 8), np.uint8), np.ones((3, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", train=train, test=test)
    data = D.load_dataset(str(tmp_path / "d.npz"), tmp_path)
    assert data["train"].shape == (5, 8, 8, 1) and data["test"].shape == (3, 8, 8, 1)


def test_npz_with_labels_gives_classes(tmp_path):
    images = np.zeros((8, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", train=images[:5], test=images[5:], train_labels=np.array([0, 2, 1, 3, 0], np.uint8),
             test_labels=np.array([1, 0, 3], np.int32))
    data = D.load_dataset(str(tmp_path / "d.npz"), tmp_path)
    assert data["num_classes"] == 4 and data["train_labels"].dtype == data["test_labels"].dtype == np.int64
    np.testing.assert_array_equal(data["train_labels"], [0, 2, 1, 3, 0])
    np.testing.assert_array_equal(data["test_labels"], [1, 0, 3])


def test_npz_with_bad_labels_is_rejected_clearly(tmp_path):
    train, test = np.zeros((4, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8)
    cases = {"short": (dict(train_labels=np.array([0, 1, 1]), test_labels=np.array([0, 1])),
                       r"d.npz\[train_labels\]: expected one label for each of the 4 images, shape \(4,\); got \(3,\)"),
             "float": (dict(train_labels=np.array([0, 1, 1, 0]), test_labels=np.array([0.0, 1.0])),
                       r"d.npz\[test_labels\]: expected integer class labels, got dtype float64"),
             "negative": (dict(train_labels=np.array([0, -1, 1, 0]), test_labels=np.array([0, 1])),
                          "label -1 is negative"),
             "one class": (dict(train_labels=np.zeros(4, int), test_labels=np.zeros(2, int)),
                           "labels 0 to 0 for 4 training images: number the classes 0, 1, ..., with at least two"),
             "too many": (dict(train_labels=np.array([0, 1, 9, 0]), test_labels=np.array([0, 1])),
                          "labels 0 to 9 for 4 training images"),
             "one split": (dict(train_labels=np.array([0, 1, 1, 0])), "'test_labels' for classes \\(both or neither\\)"),
             "unknown": (dict(labels=np.array([0, 1, 1, 0])), r"found \['train', 'test', 'labels'\]"),
             "other classes": (dict(train_labels=np.array([0, 1, 2, 3]), test_labels=np.array([10, 13])),
                               r"test_labels hold classes \[10, 13\] that train_labels do not: the two splits must "
                               r"number the same classes")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / "d.npz", train=train, test=test, **arrays)
        with pytest.raises(R.UserError, match=message):
            D.load_dataset(str(tmp_path / "d.npz"), tmp_path)


def test_a_labelled_npz_trains_a_class_conditional_prior_and_the_judge_its_classes(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = np.where(labels[:, None, None, None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 20, (40, 8, 8, 3),
                                                                                                  dtype=np.uint8)
    np.savez(tmp_path / "l.npz", train=images[:32], test=images[32:], train_labels=labels[:32], test_labels=labels[32:])
    run = tmp_path / "run"
    assert T.main(["--data", str(tmp_path / "l.npz"), "--out", str(run), "--steps", "2", "--eval-every", "2",
                   "--evaluate", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["priors"][0]["num_classes"] == 2 and config["priors"][0]["label_dropout"] == P.PriorConfig(num_classes=2).label_dropout
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["judge_task"] == "class" and 0 <= ev["accuracy_samples"] <= 1 and 0 <= ev["accuracy_recon"] <= 1


def test_array_files_with_wrong_content_are_rejected_clearly(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((4, 8, 8), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "flat.npy", np.zeros((4, 64), np.uint8))
    np.savez(tmp_path / "many.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "flat.npy").read_bytes()[:100])
    cases = {"float.npy": "expected uint8 images, got dtype float32",
             "objects.npy": "without pickle",
             "flat.npy": r"expected images of shape .* got \(4, 64\)",
             "many.npz": r"expected arrays 'train' and 'test', or a single array; found \['a', 'b'\]",
             "cut.npy": "damaged or truncated",
             "absent.npy": "no such file"}
    for name, message in cases.items():
        with pytest.raises(R.UserError, match=message):
            D.load_dataset(str(tmp_path / name), tmp_path)
    with pytest.raises(R.UserError, match="unknown dataset 'imagenet'"):
        D.load_dataset("imagenet", tmp_path)


def test_shapes_data_is_deterministic_varied_and_labelled():
    a, la = D.make_shapes(50, seed=3)
    b, lb = D.make_shapes(50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert set(la.tolist()) == {0, 1, 2}                               # circles, squares and triangles
    assert np.all(a.reshape(50, -1).std(1) > 5)                        # no blank images
    assert len({img.tobytes() for img in a}) == 50


def test_shapes64_scenes_hold_two_to_four_shapes_at_64_by_64(monkeypatch):
    monkeypatch.setattr(D, "make_shapes", lambda n, size, seed, count: ((size, count, seed), None))
    assert D.load_dataset("shapes64", "data")["train"] == (64, (2, 4), 1)
    assert D.load_dataset("shapes", "data")["test"] == (32, (1, 2), 2)
    monkeypatch.undo()
    x, labels = D.make_shapes(40, size=64, seed=0, count=(2, 4))
    assert x.shape == (40, 64, 64, 3) and set(labels.tolist()) == {0, 1, 2}
    colours = [len(np.unique(img.reshape(-1, 3), axis=0)) for img in x]
    assert min(colours) >= 2 and np.mean(colours) > 3                 # a background and its shapes' colours


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    n, bs = 10, 3                                                      # 3 batches an epoch, 1 example left out
    epoch0 = np.concatenate([D.batch_indices(7, s, n, bs) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    np.testing.assert_array_equal(D.batch_indices(7, 4, n, bs), D.batch_indices(7, 4, n, bs))
    assert not np.array_equal(D.batch_indices(7, 3, n, bs), D.batch_indices(7, 0, n, bs))


def valid_files():
    images = np.random.default_rng(1).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    npy, npz = io.BytesIO(), io.BytesIO()
    np.save(npy, images)
    np.savez(npz, train=images[:4], test=images[4:])
    return {".npy": npy.getvalue(), ".npz": npz.getvalue()}


@given(suffix=st.sampled_from([".npy", ".npz"]), kind=damage, seed=seeds)
def test_damaged_array_files_load_or_give_a_user_error(tmp_path_factory, suffix, kind, seed):
    path = tmp_path_factory.mktemp("arrays") / f"data{suffix}"
    path.write_bytes(mutate(valid_files()[suffix], kind, seed))
    try:
        data = D.array_file_dataset(path)
    except R.UserError:
        return
    assert data["train"].dtype == np.uint8 and data["train"].ndim == 4 and len(data["train"]) >= 1
    assert data["test"].shape[1:] == data["train"].shape[1:] and len(data["test"]) >= 1


@given(gz=st.booleans(), kind=damage, seed=seeds)
def test_damaged_idx_files_load_or_give_a_user_error(tmp_path_factory, gz, kind, seed):
    raw = idx_bytes(np.random.default_rng(2).integers(0, 256, (3, 5, 5), dtype=np.uint8))
    path = tmp_path_factory.mktemp("idx") / "x-idx3-ubyte"
    path.write_bytes(mutate(gzip.compress(raw) if gz else raw, kind, seed))
    try:
        a = D.read_idx(path)
    except R.UserError:
        return
    assert a.dtype == np.uint8 and 1 <= a.ndim <= 4


# -----------------------------------------------------------------------------
# speech: WAV files and the spoken digits

def raw_wav(path, samples, channels=1, width=2, rate=8000):
    """A WAV file written with the standard library alone, in any format read_wav may meet."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples)


def test_wav_round_trip_is_exact_for_int16_and_clips_and_rounds_floats(tmp_path):
    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], np.int16)
    D.write_wav(tmp_path / "a.wav", pcm)
    read = D.read_wav(tmp_path / "a.wav")
    assert read.dtype == np.int16 and read.tolist() == pcm.tolist()
    D.write_wav(tmp_path / "b.wav", read.astype(np.float32) / 32768)  # what fsdd_dataset gives: the same file
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()
    D.write_wav(tmp_path / "c.wav", np.array([-2.0, -1.0, 0.5, 1.4 / 32768, 1.6 / 32768, 1.0, 3.0]))
    assert D.read_wav(tmp_path / "c.wav").tolist() == [-32768, -32768, 16384, 1, 2, 32767, 32767]
    assert not list(tmp_path.glob("*.tmp"))                            # written through a .tmp, renamed


def test_bad_wav_files_give_one_user_error_naming_the_file_and_the_problem(tmp_path):
    pcm = np.arange(100, dtype="<i2").tobytes()
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(300))
    raw_wav(tmp_path / "stereo.wav", pcm, channels=2)
    raw_wav(tmp_path / "16k.wav", pcm, rate=16000)
    raw_wav(tmp_path / "8bit.wav", pcm, width=1)
    raw_wav(tmp_path / "empty.wav", b"")
    raw_wav(tmp_path / "cut.wav", pcm)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:-51])
    cases = {"noise.wav": r"not a readable WAV file \(Error: file does not start with RIFF id\)",
             "stereo.wav": "2 channels; expected mono",
             "16k.wav": "sampled at 16000 Hz; expected 8000 Hz",
             "8bit.wav": "8-bit samples; expected 16-bit PCM",
             "empty.wav": r"no samples \(an empty recording\)",
             "cut.wav": "truncated: 149 bytes of samples where the header promises 200",
             "absent.wav": r"not a readable WAV file \(FileNotFoundError"}
    for name, message in cases.items():
        with pytest.raises(R.UserError, match=f"^{tmp_path / name}: {message}"):
            D.read_wav(tmp_path / name)
    assert D.read_wav(tmp_path / "16k.wav", rate=16000).tolist() == list(range(100))


def fake_fsdd(folder, digits=(3, 7), speakers=("zoe", "adam"), indices=range(7)):
    """Small recordings named {digit}_{speaker}_{index}.wav whose samples encode their name, so
    that each loaded waveform can be traced back to its file. -> {name: int16 samples}."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = {}
    for d in digits:
        for s, speaker in enumerate(speakers):
            for i in indices:
                name = f"{d}_{speaker}_{i}.wav"
                clips[name] = np.array([d, s, i, -1000 * (i + 1)], np.int16)
                D.write_wav(folder / name, clips[name])
    return clips


def test_fsdd_split_labels_speakers_and_order_come_from_the_file_names(tmp_path):
    clips = fake_fsdd(tmp_path, indices=[0, 4, 5, 6, 10, 2])
    (tmp_path / "README.md").write_text("not a recording")
    (tmp_path / "notes_on_it.wav").write_bytes(b"also not one")     # a name outside the pattern: ignored
    data = D.fsdd_dataset(tmp_path)
    assert data["speakers"] == ["adam", "zoe"] and data["num_classes"] == 10 and data["sample_rate"] == 8000
    assert data["names_test"] == ["3_adam_0.wav", "3_adam_2.wav", "3_adam_4.wav", "3_zoe_0.wav", "3_zoe_2.wav",
                                  "3_zoe_4.wav", "7_adam_0.wav", "7_adam_2.wav", "7_adam_4.wav", "7_zoe_0.wav",
                                  "7_zoe_2.wav", "7_zoe_4.wav"]            # digit, speaker, then index as a number
    train_names = [f"{d}_{s}_{i}.wav" for d in (3, 7) for s in ("adam", "zoe") for i in (5, 6, 10)]
    for split, names in (("train", train_names), ("test", data["names_test"])):
        assert len(data[split]) == len(names) and all(x.dtype == np.float32 for x in data[split])
        for x, name in zip(data[split], names):
            np.testing.assert_array_equal(x * 32768, clips[name])
        assert data[f"{split}_labels"].dtype == data[f"{split}_speakers"].dtype == np.int64
        assert data[f"{split}_labels"].tolist() == [int(n[0]) for n in names]
        assert [data["speakers"][s] for s in data[f"{split}_speakers"]] == [n.split("_")[1] for n in names]


@pytest.mark.parametrize("layout", ["fsdd/recordings", "recordings", "fsdd", "."])
def test_fsdd_recordings_are_found_in_each_folder_layout(tmp_path, layout, monkeypatch):
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: pytest.fail("downloaded"))
    fake_fsdd(tmp_path / layout, digits=(1,), speakers=("ann",))
    (tmp_path / "fsdd").mkdir(exist_ok=True)                           # an empty folder earlier in the search
    data = D.load_dataset("fsdd", tmp_path)
    assert len(data["train"]) == 2 and len(data["test"]) == 5 and data["speakers"] == ["ann"]


def test_fsdd_without_a_test_or_training_recording_is_rejected(tmp_path):
    fake_fsdd(tmp_path, digits=(2,), speakers=("ann",), indices=range(5, 9))
    with pytest.raises(R.UserError, match="of 4 recordings, 4 are for training .* and 0 for testing"):
        D.fsdd_dataset(tmp_path)


def fsdd_archive(clips, extra=()):
    """An in-memory .tar.gz laid out as the dataset's release: its recordings, and other members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = [(f"free-spoken-digit-dataset-1.0.10/recordings/{n}", b) for n, b in clips.items()]
        for name, data in members + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fsdd_download_from(monkeypatch, archive, digests):
    """urlopen answers with `archive`; the recordings' digests are `digests`. -> the URLs asked for."""
    urls = []
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: urls.append(url) or Response(archive))
    monkeypatch.setattr(D, "fsdd_checksums", lambda: digests)
    return urls


def fsdd_clip_files(tmp_path):
    fake_fsdd(tmp_path / "made", digits=(4,), speakers=("ann", "bo"))
    return {p.name: p.read_bytes() for p in sorted((tmp_path / "made").iterdir())}


def test_fsdd_download_extracts_only_the_recordings_and_checks_each_sha256(tmp_path, monkeypatch):
    files = fsdd_clip_files(tmp_path)
    clip = files["4_ann_0.wav"]
    archive = fsdd_archive(files, extra=[("free-spoken-digit-dataset-1.0.10/README.md", b"# FSDD"),
                                         ("free-spoken-digit-dataset-1.0.10/recordings/../../1_evil_0.wav", clip),
                                         ("../../../../recordings/4_ann_9.wav", clip)])  # kept, by its base name
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in dict(files, **{"4_ann_9.wav": clip}).items()}
    urls = fsdd_download_from(monkeypatch, archive, digests)
    data_dir = tmp_path / "data"
    data = D.load_dataset("fsdd", data_dir)
    assert urls == [D.FSDD_URL] and D.FSDD_URL.startswith("https://")
    folder = data_dir / "fsdd" / "recordings"
    assert sorted(p.name for p in folder.iterdir()) == sorted(digests)  # no README, no .part
    assert [p.parent for p in tmp_path.parent.rglob("4_ann_9.wav")] == [folder]  # nothing escaped
    assert not list(tmp_path.parent.rglob("1_evil_0.wav"))
    assert len(data["train"]) == 5 and len(data["test"]) == 10 and data["speakers"] == ["ann", "bo"]
    assert D.load_dataset("fsdd", data_dir)["names_test"] == data["names_test"] and len(urls) == 1  # found next time


def test_fsdd_download_with_a_wrong_digest_names_the_file_and_keeps_nothing(tmp_path, monkeypatch):
    files = fsdd_clip_files(tmp_path)
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    right = digests["4_bo_3.wav"]
    digests["4_bo_3.wav"] = "0" * 64
    fsdd_download_from(monkeypatch, fsdd_archive(files), digests)
    with pytest.raises(R.UserError, match=f"4_bo_3.wav has SHA-256 {right}, but fsdd-v1.0.10.sha256 lists 0{{64}}"):
        D.fsdd_dataset(tmp_path / "data")
    assert not list((tmp_path / "data").rglob("*.wav*"))               # no recording, whole or part, is kept
    del digests["4_bo_3.wav"]
    with pytest.raises(R.UserError, match="4_bo_3.wav has SHA-256 .* lists no file of that name"):
        D.fsdd_dataset(tmp_path / "data")
    digests["4_bo_3.wav"], digests["4_cy_0.wav"] = right, right
    with pytest.raises(R.UserError, match="the archive lacks 1 of the 15 recordings .* e.g. 4_cy_0.wav"):
        D.fsdd_dataset(tmp_path / "data")
    assert not list((tmp_path / "data").rglob("*.wav*"))


def test_fsdd_download_that_cannot_be_written_whole_leaves_no_recording(tmp_path, monkeypatch):
    files = fsdd_clip_files(tmp_path)
    fsdd_download_from(monkeypatch, fsdd_archive(files), {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    replace, calls = D.os.replace, []

    def disk_full_at_the_fifth(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(D.os, "replace", disk_full_at_the_fifth)
    with pytest.raises(R.UserError, match="cannot write the recordings into .*recordings \\(No space left on device\\)"):
        D.fsdd_dataset(tmp_path / "data")
    assert len(calls) == 5 and not list((tmp_path / "data").rglob("*.wav*"))  # not a partial dataset for next time


def test_fsdd_offline_or_damaged_download_gives_a_clear_message(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise D.urllib.error.URLError("no route to host")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    folder = tmp_path / "fsdd" / "recordings"
    with pytest.raises(R.UserError, match=f"could not download .*v1.0.10.tar.gz .*no route to host.*are you offline\\? "
                                          f"Put the recordings .* into {folder} yourself, or give --data-dir"):
        D.load_dataset("fsdd", tmp_path)
    fsdd_download_from(monkeypatch, fsdd_archive(fsdd_clip_files(tmp_path))[:-100], {})
    with pytest.raises(R.UserError, match="v1.0.10.tar.gz: not a readable .tar.gz archive"):
        D.load_dataset("fsdd", tmp_path)


def test_fsdd_checksum_list_holds_the_releases_3000_recordings():
    digests = D.fsdd_checksums()
    assert len(digests) == 3000 and all(D.FSDD_NAME.fullmatch(n) for n in digests)
    assert all(len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests.values())
    assert {n.split("_")[1] for n in digests} == {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
