"""Shared by the tests: hypothesis's profiles, the gradient checks, small configs, data and runs.

Gradients are checked in float64 against central finite differences with a random upstream
gradient. Hypothesis draws the structure (sizes, strides, paddings, channels) and a seed; the
floats come from that seed. Profiles: VQVAE_HYPOTHESIS=ci (default, quick and deterministic)
or VQVAE_HYPOTHESIS=thorough (many more examples).

The test files: test_vqvae.py the maths (vqvae.py, vqvae2.py, quantizers.py, vqgan.py, prior.py)
and the model's input checks; test_audio.py the maths of audio.py (1-D layers, spectral loss,
codec); test_datasets.py, test_train.py (the command line and the run folder), test_speech.py
(the codec's run), test_evaluation.py and test_report.py the harness; test_export.py the
safetensors export and the PyTorch modules (those tests skip without PyTorch).
"""
import gzip
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st

import train as T
import vqvae as V

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("VQVAE_HYPOTHESIS", "ci"))

seeds = st.integers(0, 2**32 - 1)


# -----------------------------------------------------------------------------
# gradient checks


def f64_init(seed):
    return V.uniform_init(np.random.default_rng(seed), np, "float64")


def numerical_grad(f, a, eps=1e-6):
    """Central differences of the scalar f() with respect to every entry of `a` (perturbed in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        fp = f()
        a[i] = old - eps
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b, floor=1e-8):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), floor)


def check_layer_grads(layer, x, rng, tol=1e-6, floor=1e-3):
    """Input and parameter gradients of `layer` against finite differences of <layer(x), dy>.
    The floor keeps gradients that are tiny next to f's rounding noise (about 1e-16 |f| / eps)
    from failing on that noise: below it the check is absolute, at tol * floor."""
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)                                  # random upstream gradient
    dx = layer.backward(dy)
    grads = {k: g.copy() for k, g in layer.grads.items()}
    f = lambda: np.sum(layer.forward(x) * dy)
    assert rel_error(dx, numerical_grad(f, x), floor) < tol
    for k, p in layer.params.items():
        assert grads[k].shape == p.shape
        assert rel_error(grads[k], numerical_grad(f, p), floor) < tol, k


def check_sampled_grads(f, grads, arrays, rng, n):
    """grads[name] against central differences of the scalar f() at n random entries of each
    array (perturbed in place). A handful per tensor keeps whole-model checks quick;
    hypothesis varies which ones."""
    for name, a in arrays.items():
        for flat in rng.choice(a.size, min(a.size, n), replace=False):
            i = np.unravel_index(flat, a.shape)
            old = a[i]
            a[i] = old + 1e-6
            fp = f()
            a[i] = old - 1e-6
            fm = f()
            a[i] = old
            num = (fp - fm) / 2e-6
            assert abs(grads[name][i] - num) <= 1e-5 * max(abs(num), 1e-3), (name, i, grads[name][i], num)


# -----------------------------------------------------------------------------
# small configs, data and runs


TINY = ["--hidden", "8", "--res-hidden", "4", "--res-blocks", "1", "-K", "16", "-D", "4", "--batch-size", "4",
        "--prior-steps", "2", "--prior-channels", "4", "--prior-layers", "2", "--prior-batch-size", "4",
        "--judge-steps", "2", "--two-sample-steps", "2", "--eval-images", "8"]


@pytest.fixture
def tiny_data(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "tiny.npy", images)
    return str(tmp_path / "tiny.npy")


def metric_lines(run, stage="vqvae"):
    return [m for m in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if m["stage"] == stage]


def tiny_run(tmp_path, data, name="run", steps=4, extra=()):
    run = tmp_path / name
    assert T.main(["--data", data, "--out", str(run), "--steps", str(steps), "--eval-every", "2", *TINY, *extra]) == 0
    return run


def one_error_line(capsys):
    """The one line a user error prints (and that it is the only line from train.py)."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("train.py")]
    assert len(lines) == 1, err
    return lines[0]


def idx_bytes(array):
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian dimensions, the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for kind, a in zip(("images-idx3", "labels-idx1"), arrays[prefix]):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(a)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def tiny_config(**kw):
    """A small float64 model config; the quantizer and the codebook's health as the paper has them
    (Config's defaults are train.py's), unless given."""
    base = dict(in_channels=2, hidden=4, res_hidden=3, res_blocks=1, codebook_size=6, code_dim=3, dtype="float64",
                quantizer="vq", kmeans_init=False, restart_threshold=0.0, top_only_rate=0.0, top_codebook_size=0)
    base.update(kw)
    return V.Config(**base)


def read_png(path):
    """A minimal PNG reader (8-bit grey or RGB, filter 0): checks every chunk's CRC."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body, crc = data[pos + 8:pos + 8 + n], struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(tag + body) == crc, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert [c[0] for c in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    W, H, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    C = {0: 1, 2: 3}[colour]
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(H, 1 + W * C)
    assert depth == 8 and np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(H, W, C)


# -----------------------------------------------------------------------------
# damaged bytes

def mutate(data, kind, seed):
    """A damaged copy of `data`: random bytes, cut short, a few bytes changed anywhere, or a
    few changed in the first 128 bytes (where the headers are)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.bytes(int(rng.integers(0, 2 * len(data) + 1)))
    if kind == "truncated":
        return data[:int(rng.integers(0, len(data)))]
    b = bytearray(data)
    span = len(b) if kind == "flipped" else min(len(b), 128)
    for i in rng.integers(0, span, int(rng.integers(1, 9))):
        b[i] = int(rng.integers(256))
    return bytes(b)


damage = st.sampled_from(["random", "truncated", "flipped", "header"])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
