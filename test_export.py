"""export.py and torch_modules.py: the safetensors format written and read back, damaged or
foreign files refused with one line that names the problem, a run's export read back to the same
codes, images and samples, and (where PyTorch is installed) the export loaded into torch_modules'
tree with strict=True, computing what ours computes."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

import config
import export as E
import prior as P
import runs
import train as T
import vqvae as V
from codes import sample_images
from conftest import TINY, damage, mutate, seeds
from datasets import to_model
from runs import UserError

# -----------------------------------------------------------------------------
# the file format


def tensor_for(dtype, shape, rng):
    """Random values of a safetensors dtype: the full range of an integer type, normals for floats."""
    dt = np.dtype(E.DTYPES[dtype])
    if dt.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.asarray(rng.integers(info.min, info.max, shape, dtype=dt.newbyteorder("="), endpoint=True))
    return np.asarray(rng.standard_normal(shape), dt)


names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8).filter(lambda s: s != "__metadata__")


@given(specs=st.dictionaries(names, st.tuples(st.sampled_from(list(E.DTYPES)), st.lists(st.integers(0, 3), max_size=3)),
                             max_size=5),
       metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), seed=seeds)
def test_written_tensors_and_metadata_read_back_bit_for_bit(tmp_path_factory, specs, metadata, seed):
    rng = np.random.default_rng(seed)
    tensors = {name: tensor_for(dtype, shape, rng) for name, (dtype, shape) in specs.items()}
    path = tmp_path_factory.mktemp("roundtrip") / "t.safetensors"
    E.write_safetensors(path, tensors, metadata)
    back, meta = E.read_safetensors(path)
    assert meta == metadata and list(back) == list(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape and back[name].tobytes() == a.tobytes()
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0                                                  # the tensors start 8-byte aligned


def test_the_bytes_are_the_formats_little_endian_header_then_data(tmp_path):
    path = tmp_path / "t.safetensors"
    E.write_safetensors(path, {"a": np.array([[1, 2]], ">i4"), "b": np.array([0.5], np.float64)}, {"k": "v"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert header == {"a": {"dtype": "I32", "shape": [1, 2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}, "__metadata__": {"k": "v"}}
    assert data[8 + n:] == struct.pack("<2i", 1, 2) + struct.pack("<d", 0.5)   # big-endian input, written little
    assert not list(tmp_path.glob("*.tmp"))                            # written to a .tmp, then renamed


def safetensors_bytes(header, data=b"", n=None):
    """A file from its parts: the header (a dict as JSON, or raw bytes), its length n (default: the
    true one) and the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
DAMAGED = [
    (b"abc", "3 bytes, shorter than the 8 of its header length"),
    (safetensors_bytes({}, n=1000), "header length 1000 is larger than the 2 bytes after it"),
    (safetensors_bytes({}, n=2**40), "over the format's limit"),
    (safetensors_bytes(b"{not json"), "the header is not JSON"),
    (safetensors_bytes(b"\xff\xfe{}"), "the header is not UTF-8 text"),
    (safetensors_bytes(b"[1, 2]"), "the header is a JSON list, not an object of tensors"),
    (safetensors_bytes(b'{"a": 1, "a": 2}'), "the header names 'a' twice"),
    (safetensors_bytes({"a": {"dtype": "F32"}}), "expected an object with dtype, shape and data_offsets"),
    (safetensors_bytes({"a": {**F32, "dtype": "Q7"}}, bytes(4)), "unknown dtype 'Q7'"),
    (safetensors_bytes({"a": {**F32, "dtype": "BF16"}}, bytes(4)), "unknown dtype 'BF16' (this reader knows F64"),
    (safetensors_bytes({"a": {**F32, "shape": [-1]}}, bytes(4)), "shape [-1] is not a list of sizes >= 0"),
    (safetensors_bytes({"a": {**F32, "data_offsets": [4, 0]}}, bytes(4)), "are not [begin, end]"),
    (safetensors_bytes({"a": {**F32, "shape": [2]}}, bytes(4)), "shape [2] of F32 needs 8 bytes, its data_offsets "
                                                                 "[0, 4] hold 4"),
    (safetensors_bytes({"a": {**F32, "data_offsets": [0, 8]}}, bytes(4)), "reach past the 4 bytes of data"),
    (safetensors_bytes({"a": F32, "b": F32}, bytes(4)), "overlaps the one before it"),
    (safetensors_bytes({"a": {**F32, "data_offsets": [4, 8]}}, bytes(8)), "4 bytes at 0 belong to no tensor"),
    (safetensors_bytes({"a": F32}, bytes(6)), "2 bytes after the last tensor belong to none (trailing data)"),
    (safetensors_bytes({"a": F32, "__metadata__": {"k": 1}}, bytes(4)), "__metadata__ must map strings to strings"),
    (safetensors_bytes({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\x02"),
     "BOOL tensor 'a' holds bytes other than 0 and 1"),
]


@pytest.mark.parametrize("data, message", DAMAGED)
def test_a_damaged_or_foreign_file_gets_one_error_naming_the_problem(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        E.read_safetensors(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@given(kind=damage, seed=seeds)
def test_damaged_bytes_raise_nothing_but_a_value_error(tmp_path_factory, kind, seed):
    path = tmp_path_factory.mktemp("damaged") / "t.safetensors"
    E.write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, bool)}, {"k": "v"})
    path.write_bytes(mutate(path.read_bytes(), kind, seed))
    try:
        tensors, _ = E.read_safetensors(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:                                                              # what reads must be whole and consistent
        assert all(isinstance(a, np.ndarray) for a in tensors.values())


def test_the_safetensors_library_reads_our_files_and_we_read_its(tmp_path):
    """Skipped without the library (never a dependency): both ways, every dtype both know."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {dtype: tensor_for(dtype, (2, 3), rng) for dtype in E.DTYPES} | {"scalar": np.array(1.5), "empty":
                                                                             np.zeros((0, 2), np.float32)}
    E.write_safetensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    st_numpy.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    for read in (st_numpy.load_file(str(tmp_path / "ours.safetensors")),
                 E.read_safetensors(tmp_path / "theirs.safetensors")[0]):
        assert all(read[k].dtype == a.dtype and read[k].shape == a.shape and read[k].tobytes() == a.tobytes()
                   for k, a in tensors.items())


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"a": [1.0]}, {}, "tensor 'a' is a list, not a NumPy array"),
    ({"a": np.ones(2, np.complex64)}, {}, "dtype complex64, which safetensors cannot hold"),
    ({"__metadata__": np.ones(2)}, {}, "'__metadata__' cannot name a tensor"),
    ({"a": np.ones(2)}, {"k": 1}, "metadata must map strings to strings"),
])
def test_what_safetensors_cannot_hold_is_refused_before_anything_is_written(tmp_path, tensors, metadata, message):
    with pytest.raises(ValueError, match=message):
        E.write_safetensors(tmp_path / "t.safetensors", tensors, metadata)
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# a run's export, read back


@pytest.fixture(scope="module")
def runs_(tmp_path_factory):
    """Two tiny finished runs on labelled 16 x 16 images: one level, two levels (EMA codebooks,
    class-conditional priors with label dropout, attention; two levels: a bottom prior given the top).
    No k-means start or restarts: in so small a run they leave codebook rows equal to rounding, where
    PyTorch's rounding, not the model, would choose between two codes."""
    folder = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             test=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), train_labels=rng.integers(0, 3, 40),
             test_labels=rng.integers(0, 3, 8))
    made = {}
    for levels, extra in ((1, []), (2, ["--levels", "2", "--prior-attention-every", "1", "--no-kmeans-init",
                                                  "--restart-threshold", "0"])):
        run = made[levels] = folder / f"levels{levels}"
        assert T.main(["--data", str(folder / "data.npz"), "--out", str(run), "--steps", "4", "--eval-every", "2",
                       *TINY, "--no-evaluate", *extra]) == 0
        assert E.export_command(["--run", str(run), "--out", str(folder / f"levels{levels}.safetensors")]) == 0
    return made


def export_cli(*args):
    """`train.py export ARGS` as train.main runs a subcommand -> (0, '') or (1, the error's one line)."""
    try:
        return E.export_command([str(a) for a in args]), ""
    except UserError as e:
        return 1, str(e)


SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0, guidance=1.0)


@pytest.mark.parametrize("levels", [1, 2])
def test_an_export_read_back_gives_bit_identical_codes_images_and_samples(runs_, levels):
    run = runs_[levels]
    model, priors, hw = runs.load_trained(run, "cpu")
    back, back_priors, back_hw = E.load_export(run.with_suffix(".safetensors"), "cpu")
    assert back_hw == hw and back.cfg == model.cfg and [p.cfg for p in back_priors] == [p.cfg for p in priors]
    x = to_model(np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    codes, codes_back = model.encode(x), back.encode(x)
    for a, b in zip(*((c if levels == 2 else (c,)) for c in (codes, codes_back))):
        assert np.array_equal(a, b)
    assert np.array_equal(model.reconstruct(x), back.reconstruct(x))
    labels = np.arange(6) % 3
    images, sampled, _ = sample_images(model, priors, 6, 7, SAMPLING, hw, labels)
    images_back, sampled_back, _ = sample_images(back, back_priors, 6, 7, SAMPLING, hw, labels)
    assert np.array_equal(images, images_back) and all(np.array_equal(a, b) for a, b in zip(sampled, sampled_back))


def test_init_from_fills_models_built_here_with_the_runs_tensors(runs_):
    model, priors, _ = runs.load_trained(runs_[2], "cpu")
    fresh = V.make_model(model.cfg, "cpu")
    fresh_priors = [P.PixelCNN(p.cfg, "cpu") for p in priors]
    E.init_from(runs_[2].with_suffix(".safetensors"), fresh, fresh_priors)
    for ours, theirs in [(model, fresh), *zip(priors, fresh_priors)]:
        for k, a in E.exported(ours).items():
            assert np.array_equal(a, E.exported(theirs)[k]), k
    only = V.make_model(model.cfg, "cpu")                              # without priors: their tensors are left out
    E.init_from(runs_[2].with_suffix(".safetensors"), only)
    assert np.array_equal(only.quantizer.codebook, model.quantizer.codebook)


def test_init_from_refuses_missing_extra_and_misshapen_tensors_in_one_line_and_changes_nothing(runs_, tmp_path):
    path = runs_[1].with_suffix(".safetensors")
    tensors, meta = E.read_safetensors(path)
    model, priors, _ = runs.load_trained(runs_[1], "cpu")
    before = {k: a.copy() for k, a in E.export_tensors(model, priors).items()}
    broken = dict(tensors)
    del broken["vqvae.encoder.0.weight"]
    broken["vqvae.extra.weight"] = np.ones(2, np.float32)
    broken["prior.embed.weight"] = np.ones((3, 3), np.float32)
    E.write_safetensors(tmp_path / "b.safetensors", broken, meta)
    with pytest.raises(UserError) as e:
        E.init_from(tmp_path / "b.safetensors", model, priors)
    assert str(e.value) == (f"{tmp_path / 'b.safetensors'}: not these models' tensors: missing vqvae.encoder.0.weight; "
                            f"extra vqvae.extra.weight; wrong shape prior.embed.weight (3, 3) (expected (16, 4))")
    nan = {**tensors, "vqvae.decoder.0.bias": np.full(8, np.nan, np.float32)}
    E.write_safetensors(tmp_path / "n.safetensors", nan, meta)
    with pytest.raises(UserError, match="'vqvae.decoder.0.bias' holds NaN or infinite values"):
        E.init_from(tmp_path / "n.safetensors", model, priors)
    with pytest.raises(UserError, match="not a safetensors file"):
        E.init_from(runs_[1] / "checkpoint.npz", model, priors)
    assert all(np.array_equal(a, before[k]) for k, a in E.export_tensors(model, priors).items())
    E.write_safetensors(tmp_path / "v.safetensors", {k: a for k, a in tensors.items() if k.startswith("vqvae.")})
    with pytest.raises(UserError, match=r"tensors: missing prior\.\S+, .* and 28 more$"):  # priors asked for, none there
        E.init_from(tmp_path / "v.safetensors", model, priors)
    with pytest.raises(UserError, match="no vqvae.config in its __metadata__"):
        E.load_export(tmp_path / "v.safetensors")


def test_the_export_command_writes_once_and_refuses_bad_input_with_one_line(runs_, tmp_path):
    run = runs_[1]
    out = tmp_path / "m.safetensors"
    assert export_cli("--run", run, "--out", out) == (0, "")
    assert export_cli("--run", run, "--out", out) == (1, f"--out {out}: the file exists; give --force to write over "
                                                         f"it, or another name")
    assert export_cli("--run", run, "--out", out, "--force") == (0, "")
    code, line = export_cli("--run", run, "--out", tmp_path / "m.pt")
    assert code == 1 and "this writes SAFETENSORS data: give a name ending in .safetensors" in line
    code, line = export_cli("--run", tmp_path / "nothing", "--out", tmp_path / "x.safetensors")
    assert code == 1 and "no such checkpoint" in line
    speech = tmp_path / "speech"
    speech.mkdir()
    (speech / "config.json").write_text('{"train": {}, "codec": {}}')
    assert export_cli("--run", speech, "--out", tmp_path / "x.safetensors")[1] == (
        f"{speech} holds the audio codec; export writes a run of images (the VQ-VAE and its priors)")
    tensors, meta = E.read_safetensors(out)
    E.write_safetensors(tmp_path / "c.safetensors", tensors, {**meta, "prior.config": '{"layers": 0}'})
    with pytest.raises(UserError, match=r"unreadable configs in its __metadata__ \(layers must be >= 1, got 0\)"):
        E.load_export(tmp_path / "c.safetensors")


@pytest.mark.parametrize("levels", [1, 2])
def test_an_imported_export_is_a_run_that_samples_as_the_original_and_is_evaluated_and_resumed(runs_, tmp_path, levels):
    run, data = runs_[levels], runs_[levels].parent / "data.npz"
    file, imported = run.parent / f"levels{levels}.safetensors", tmp_path / "imported"
    assert T.main(["import", "--file", str(file), "--data", str(data), "--out", str(imported)]) == 0
    for r in (run, imported):                                          # the same codes from the same seed
        assert T.main(["sample", "--run", str(r), "--seed", "4", "--codes-out", str(tmp_path / f"{r.name}.npz")]) == 0
    with np.load(tmp_path / f"levels{levels}.npz") as a, np.load(tmp_path / "imported.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert T.main(["evaluate", "--run", str(imported), "--judge-steps", "2", "--two-sample-steps", "0",
                   "--images", "4"]) == 0
    assert (imported / "evaluation.json").is_file() and T.main(["report", "--run", str(imported)]) == 0
    assert T.main(["--resume", str(imported), "--stage", "vqvae", "--steps", str(config.TrainConfig().steps + 1),
                   "--no-evaluate"]) == 0                               # fine-tuned here, a step further
    assert T.main(["import", "--file", str(file), "--data", str(data), "--out", str(imported)]) == 1
    assert T.main(["import", "--file", str(tmp_path / "none.safetensors"), "--data", str(data),
                   "--out", str(tmp_path / "x")]) == 1
    grey = tmp_path / "grey.npy"
    np.save(grey, np.zeros((10, 16, 16, 1), np.uint8))
    assert T.main(["import", "--file", str(file), "--data", str(grey), "--out", str(tmp_path / "y")]) == 1
    assert not (tmp_path / "y").exists()                               # refused before the folder is made


def test_a_run_without_its_priors_exports_the_vqvae_alone(runs_, tmp_path):
    run = tmp_path / "vqvae_only"
    assert T.main(["--data", str(runs_[1].parent / "data.npz"), "--out", str(run), "--steps", "2", *TINY,
                   "--stage", "vqvae", "--no-evaluate"]) == 0
    assert export_cli("--run", run, "--out", tmp_path / "v.safetensors") == (0, "")
    model, priors, hw = E.load_export(tmp_path / "v.safetensors")
    assert priors is None and hw == (16, 16)
    assert all(k.startswith("vqvae.") for k in E.read_safetensors(tmp_path / "v.safetensors")[0])


# -----------------------------------------------------------------------------
# PyTorch: the export in torch_modules' tree computes what ours computes


def compare_with_torch(path, model, priors, x, rng):
    """Load `path` into torch_modules' tree with strict=True, then compare: codes exactly, the
    decoded images and each prior's logits to float32 rounding."""
    torch = pytest.importorskip("torch")
    import torch_modules
    tensors, meta = E.read_safetensors(path)
    net = torch_modules.from_metadata(meta)
    net.load_state_dict({k: torch.from_numpy(a) for k, a in tensors.items()}, strict=True)
    net.eval()
    tol = dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ours = model.encode(x)
        ours = ours if isinstance(ours, tuple) else (ours,)
        theirs = net.vqvae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for a, b in zip(ours, theirs):
            assert np.array_equal(a, b.numpy())
        images = net.vqvae.decode(*map(torch.from_numpy, ours)).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(images, model.decode(*ours), **tol)
        if model.cfg.levels == 2:                                      # from the top codes alone
            top_only = net.vqvae.decode(torch.from_numpy(ours[0])).numpy().transpose(0, 2, 3, 1)
            np.testing.assert_allclose(top_only, model.decode(ours[0]), **tol)
        modules = [net.top_prior, net.prior] if model.cfg.levels == 2 else [net.prior]
        for level, (prior, module) in enumerate(zip(priors, modules)):
            grid = ours[level]
            labels = rng.integers(0, prior.cfg.num_classes + 1, len(grid)) if prior.cfg.num_classes else None
            cond_codes = ours[0] if prior.cfg.cond_codebook_size else None
            logits = module(torch.from_numpy(grid), None if labels is None else torch.from_numpy(labels),
                            cond_codes=None if cond_codes is None else torch.from_numpy(cond_codes))
            np.testing.assert_allclose(logits.numpy().transpose(0, 2, 3, 1),
                                       prior.forward(grid, labels, cond_codes=cond_codes), **tol)


@pytest.mark.parametrize("levels", [1, 2])
def test_a_runs_export_loads_strictly_into_torch_modules_and_computes_the_same(runs_, levels):
    pytest.importorskip("torch")
    model, priors, _ = runs.load_trained(runs_[levels], "cpu")
    rng = np.random.default_rng(2)
    x = to_model(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    compare_with_torch(runs_[levels].with_suffix(".safetensors"), model, priors, x, rng)


@pytest.mark.parametrize("levels", [1, 2])
def test_the_default_runs_models_load_strictly_into_torch_modules_and_compute_the_same(tmp_path, levels):
    """The models `python train.py` (and --levels 2) trains, at their default sizes: untrained,
    but every tensor named and shaped as torch_modules' tree has it."""
    pytest.importorskip("torch")
    model_cfg = V.Config(levels=levels)
    model = V.make_model(model_cfg, "cpu")
    priors = [P.PixelCNN(cfg, "cpu") for cfg in config.prior_configs({}, model_cfg, 3, 0)]  # shapes' 3 classes
    E.write_export(tmp_path / "d.safetensors", model, priors, (32, 32))
    rng = np.random.default_rng(3)
    x = to_model(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    compare_with_torch(tmp_path / "d.safetensors", model, priors, x, rng)


def test_torch_modules_load_is_the_documented_path_and_says_which_quantizers_it_mirrors(runs_):
    torch = pytest.importorskip("torch")
    import torch_modules
    net = torch_modules.load(runs_[1].with_suffix(".safetensors"))
    assert not net.training and set(dict(net.named_children())) == {"vqvae", "prior"}
    assert torch.equal(net.vqvae.quantizer.ema_sum, torch.from_numpy(runs.load_trained(runs_[1], "cpu")[0]
                                                                      .quantizer.buffers["ema_sum"]))
    with pytest.raises(NotImplementedError, match="mirrors the quantizers vq and ema, not fsq"):
        torch_modules.module_for(V.Config(quantizer="fsq"))
