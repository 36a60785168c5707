"""A run's models as one .safetensors file, under the names and layouts of PyTorch modules
(torch_modules.py), and such a file read back: the standard library and NumPy, nothing else.

    python train.py export --run runs/RUN --out model.safetensors     # export_command
    load_export(path, device) -> (model, priors, image_hw)            # rebuilt from the file alone
    init_from(path, model, priors)                                    # into models built here

The safetensors format (https://huggingface.co/docs/safetensors), which this file writes and reads:

    8 bytes    N, an unsigned little-endian 64-bit integer: the length of the header
    N bytes    a JSON object {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
               ..., "__metadata__": {string: string}}, padded with spaces
    the rest   every tensor's bytes, little-endian, C order, end to end; tensor `name` is
               data[begin:end] of this part, and the tensors cover it with no gap and no overlap

The names are ours with the last part renamed as PyTorch names it (W -> weight, b -> bias, an
Embedding's table -> weight), prefixed by the model: 'vqvae.', 'prior.' and, for two levels,
'top_prior.'. The metadata holds each model's config as JSON, so that a file is self-describing.
docs/export.md lists the tensors; test_export.py proves that PyTorch computes what we compute.
"""
import json
import math
import os
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

import prior as P
import vqvae
from codes import level_names
from config import TrainConfig, prior_configs
from datasets import load_dataset
from runs import (READ_ERRORS, RunLock, UserError, atomic_write, check_output, fingerprint, load_trained,
                  make_run_folder, read_json, save_checkpoint, save_json, unreadable)
from settings import ArgumentParser

# -----------------------------------------------------------------------------
# the file format

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}   # safetensors name -> NumPy's
NAMES = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}      # NumPy's (native order) -> name
MAX_HEADER = 100_000_000   # bytes: the safetensors library's own limit; a larger header is damage


def write_safetensors(path, tensors, metadata=None):
    """Write `tensors` (name -> NumPy array) and `metadata` (string -> string) as a safetensors
    file, whole or not at all (runs.atomic_write: a .tmp beside it, renamed into place; a UserError
    where it cannot be written). What the format cannot hold is a ValueError, before any writing."""
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings, got {metadata!r:.200}")
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"{path}: {name!r} cannot name a tensor")
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{path}: tensor {name!r} is a {type(a).__name__}, not a NumPy array")
        dtype = NAMES.get(a.dtype.newbyteorder("="))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold "
                             f"(it holds {', '.join(DTYPES)})")
        data = np.ascontiguousarray(a, dtype=DTYPES[dtype]).tobytes()  # little-endian, C order
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)                                    # the tensors start 8-byte aligned
    atomic_write(path, struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_safetensors(path):
    """A safetensors file -> (tensors: name -> NumPy array, metadata: string -> string). Anything
    that is not such a file, whole and consistent, raises a ValueError naming the file and what
    is wrong with it; an unreadable file raises the OSError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8 of its header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file: a header length of {n} bytes, over the format's "
                             f"limit of {MAX_HEADER}")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} is larger than the {size - 8} bytes after it "
                             f"(a file cut short?)")
        header = parse_header(path, f.read(n))
        buffer = bytearray(size - 8 - n)                               # the tensors' bytes, read once: the
        if f.readinto(buffer) != len(buffer):                          # arrays are views of it, writable
            raise ValueError(f"{path}: the file changed while it was read")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    spans = []
    for name, entry in header.items():
        spans.append((*check_entry(path, name, entry, len(buffer)), name))
    end = 0
    for begin, stop, name in sorted(spans):                            # the tensors must tile the data exactly
        if begin < end:
            raise ValueError(f"{path}: tensor {name!r} at bytes {begin}..{stop} overlaps the one before it, which "
                             f"ends at {end}")
        if begin > end:
            raise ValueError(f"{path}: {begin - end} bytes at {end} belong to no tensor (before {name!r})")
        end = stop
    if end != len(buffer):
        raise ValueError(f"{path}: {len(buffer) - end} bytes after the last tensor belong to none (trailing data)")
    tensors = {}
    for begin, stop, name in spans:
        entry = header[name]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        a = np.frombuffer(buffer, dtype, (stop - begin) // dtype.itemsize, begin).reshape(entry["shape"])
        if dtype == bool and not set(np.unique(a.view(np.uint8)).tolist()) <= {0, 1}:
            raise ValueError(f"{path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
        tensors[name] = a.astype(dtype.newbyteorder("="), copy=False)  # native order (a copy on big-endian only)
    return tensors, metadata


def parse_header(path, text):
    """The header's bytes -> its JSON object, with a repeated name refused."""
    def unique(pairs):
        names = [k for k, _ in pairs]
        twice = sorted({k for k in names if names.count(k) > 1})
        if twice:
            raise ValueError(f"{path}: the header names {twice[0]!r} twice")
        return dict(pairs)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the header is not UTF-8 text ({e})")
    except RecursionError:
        raise ValueError(f"{path}: the header is not JSON (nested too deeply)")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the header is not JSON ({e})")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
    return header


def check_entry(path, name, entry, size):
    """One tensor's header entry, checked against the `size` bytes of data -> its (begin, end)."""
    where = f"{path}: tensor {name!r}"
    if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
        raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets, got {entry!r:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r:.40} (this reader knows {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{where}: shape {shape!r:.200} is not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r:.200} are not [begin, end] with 0 <= begin <= end")
    if offsets[1] > size:
        raise ValueError(f"{where}: data_offsets {offsets} reach past the {size} bytes of data (a file cut short?)")
    need = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != need:
        raise ValueError(f"{where}: shape {shape} of {dtype} needs {need} bytes, its data_offsets {offsets} hold "
                         f"{offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


# -----------------------------------------------------------------------------
# our models <-> PyTorch's names

RENAME = {"W": "weight", "b": "bias", "table": "weight"}  # the last part of a name: ours -> torch.nn's


def torch_name(name):
    """Our parameter name -> the PyTorch module tree's: 'encoder.0.W' -> 'encoder.0.weight'."""
    head, dot, last = name.rpartition(".")
    return head + dot + RENAME.get(last, last)


def exported(model):
    """The live arrays of a model (VQVAE, VQVAE2 or PixelCNN) that an export holds, by PyTorch name:
    every parameter, and the floating-point buffers (an EMA codebook and its moving averages);
    not the integer step counters, which only resuming a training run here needs."""
    arrays = {**model.params, **{k: v for k, v in model.buffers.items() if v.dtype.kind == "f"}}
    named = {torch_name(k): v for k, v in arrays.items()}
    assert len(named) == len(arrays), "two of our names map to one PyTorch name"
    return named


def prefixes(levels):
    """The prefix of each model's tensors: the VQ-VAE's, then the priors', coarsest first."""
    return "vqvae.", (["top_prior.", "prior."] if levels == 2 else ["prior."])


def export_tensors(model, priors=None):
    """Host copies of everything an export of `model` and its priors holds, by full name."""
    vq_prefix, prior_prefixes = prefixes(model.cfg.levels)
    parts = [(vq_prefix, model), *zip(prior_prefixes, priors or [])]
    return {prefix + k: vqvae.to_numpy(v) for prefix, m in parts for k, v in exported(m).items()}


def export_metadata(model, priors=None, image_hw=None):
    """The strings a file carries beside its tensors: the format, and each model's config as JSON."""
    vq_prefix, prior_prefixes = prefixes(model.cfg.levels)
    meta = {"format": "vqvae-export", "version": "1", "names": "torch_modules.py: ours with W -> weight, "
            "b -> bias, table -> weight", f"{vq_prefix}config": json.dumps(asdict(model.cfg))}
    meta.update({f"{prefix}config": json.dumps(asdict(p.cfg)) for prefix, p in zip(prior_prefixes, priors or [])})
    if image_hw is not None:
        meta["image_hw"] = json.dumps(list(image_hw))
    return meta


def write_export(path, model, priors=None, image_hw=None):
    """One file with `model`, its `priors` (coarsest first) and the image size they were trained on
    -> the number of tensors written."""
    tensors = export_tensors(model, priors)
    write_safetensors(path, tensors, export_metadata(model, priors, image_hw))
    return len(tensors)


# -----------------------------------------------------------------------------
# a run's export, and back


def export_run(run, out):
    """Write RUN's VQ-VAE and the priors it has (none, before its prior stage) to `out` -> the
    number of tensors written."""
    run = Path(run)
    if (run / "config.json").is_file() and "codec" in read_json(run / "config.json", "run config"):
        raise UserError(f"{run} holds the audio codec; export writes a run of images (the VQ-VAE and its priors)")
    model, priors, image_hw = load_trained(run, "cpu", need_priors=False)
    return write_export(out, model, priors, image_hw)


def read_export(path):
    """A file written by export_run (or by PyTorch with the metadata it came with) -> (tensors,
    vqvae.Config, [PriorConfig, ...] coarsest first, image (h, w) or None); a UserError naming
    the file and the problem where it is not one."""
    tensors, meta = read_file(path)
    return (tensors, *read_configs(meta, path))


def read_configs(meta, path):
    """An export's __metadata__ -> (vqvae.Config, [PriorConfig, ...] coarsest first, image (h, w)
    or None), each config checked as a run's config.json is."""
    if "vqvae.config" not in meta:
        raise UserError(f"{path}: no vqvae.config in its __metadata__: not written by train.py export (a "
                        f"state_dict without it loads into models built here with export.init_from)")
    try:
        model_cfg = vqvae.Config.from_dict(json.loads(meta["vqvae.config"]))
        prior_prefixes = prefixes(model_cfg.levels)[1]
        prior_cfgs = [P.PriorConfig.from_dict(json.loads(meta[f"{prefix}config"]))
                      for prefix in prior_prefixes if f"{prefix}config" in meta]
        if prior_cfgs and len(prior_cfgs) != len(prior_prefixes):
            raise ValueError(f"{len(prior_cfgs)} prior configs for a model of {model_cfg.levels} levels")
        if [c.codebook_size for c in prior_cfgs] not in ([], model_cfg.level_num_codes):
            raise ValueError(f"the priors model {[c.codebook_size for c in prior_cfgs]} codes, the VQ-VAE has "
                             f"{model_cfg.level_num_codes} per level")
        image_hw = json.loads(meta["image_hw"]) if "image_hw" in meta else None
        if image_hw is not None and not (isinstance(image_hw, list) and len(image_hw) == 2 and
                                         all(type(v) is int and 0 < v <= 2**14 for v in image_hw)):
            raise ValueError(f"image_hw {image_hw!r:.50} is not a height and a width")
    except (ValueError, TypeError, RecursionError) as e:               # SettingError is a ValueError
        raise UserError(f"{path}: unreadable configs in its __metadata__ ({e})")
    return model_cfg, prior_cfgs, (tuple(image_hw) if image_hw else None)


def load_export(path, device=None):
    """The models of an export, rebuilt from the configs it carries -> (model, priors or None,
    image (h, w) or None), as runs.load_trained gives a run's."""
    tensors, model_cfg, prior_cfgs, image_hw = read_export(path)
    model = vqvae.make_model(model_cfg, device)
    priors = [P.PixelCNN(cfg, device) for cfg in prior_cfgs] or None
    load_tensors(path, tensors, model, priors)
    return model, priors, image_hw


def init_from(path, model, priors=None):
    """Copy the tensors of an export (or of a state_dict of torch_modules' tree, saved elsewhere)
    into models built here: the VQ-VAE, and the priors too when given (else the file's prior
    tensors are left out). Every tensor they hold must be in the file, shaped alike, and the file
    must hold no other; all is checked before anything is copied."""
    tensors, _ = read_file(path)                                        # the configs are not needed
    load_tensors(path, tensors, model, priors)


def read_file(path):
    """read_safetensors, its errors as one UserError that names the file."""
    try:
        return read_safetensors(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file")
    except READ_ERRORS as e:                                           # ValueError: damaged; OSError: unreadable
        raise UserError(str(e)) if type(e) is ValueError else unreadable(path, "cannot read the file", e)


def load_tensors(path, tensors, model, priors=None):
    """The shared part of load_export and init_from: names and shapes checked, all at once, then
    the arrays copied in (vqvae.load_arrays: finite numbers, cast to the model's dtype)."""
    vq_prefix, prior_prefixes = prefixes(model.cfg.levels)
    parts = [(vq_prefix, model), *zip(prior_prefixes, priors or [])]
    if priors is not None and len(priors) != len(prior_prefixes):
        raise ValueError(f"{len(priors)} priors for a model of {model.cfg.levels} levels")
    live = {prefix + k: v for prefix, m in parts for k, v in exported(m).items()}
    skipped = prior_prefixes if priors is None else []                 # the file's priors, not asked for
    given = {k for k in tensors if not any(k.startswith(p) for p in skipped)}
    missing, extra = sorted(live.keys() - given), sorted(given - live.keys())
    shaped = sorted(f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})" for k, v in live.items()
                    if k in tensors and tuple(tensors[k].shape) != v.shape)
    problems = [f"{what} {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
                for what, names in (("missing", missing), ("extra", extra), ("wrong shape", shaped)) if names]
    if problems:
        raise UserError(f"{path}: not these models' tensors: {'; '.join(problems)}")
    try:
        vqvae.load_arrays(live, tensors, model.xp, what=str(path), whose="the model")
    except ValueError as e:                                            # NaN, or not numbers
        raise UserError(str(e))


# -----------------------------------------------------------------------------
# the command


def export_command(argv):
    """`train.py export`: a finished run's VQ-VAE and priors -> one .safetensors file."""
    p = ArgumentParser(prog="train.py export", description="Write a run's VQ-VAE and priors as one .safetensors "
                                                           "file, for torch_modules.py (docs/export.md).")
    p.add_argument("--run", required=True, help="the run folder")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="write over --out if it exists")
    args = p.parse_args(argv)
    check_output(args.out, "--out", ".safetensors", args.force)        # before the models are read
    n = export_run(args.run, args.out)
    print(f"wrote {args.out}: {n} tensors (load them with torch_modules.load, or export.load_export here)",
          file=sys.stderr)
    return 0


def import_command(argv):
    """`train.py import`: an export (trained or fine-tuned elsewhere) -> a finished run folder here,
    which `sample`, `evaluate`, `report` and `--resume` read as one of their own."""
    p = ArgumentParser(prog="train.py import", description="Make a run folder of a .safetensors file written by "
                                                           "train.py export (or by PyTorch from torch_modules.py).")
    p.add_argument("--file", required=True, help="the .safetensors file")
    p.add_argument("--out", required=True, help="the run folder to make (it must not hold a run)")
    p.add_argument("--data", required=True, help="the data its models fit, as for training (the judge of "
                                                 "`evaluate` learns on it)")
    p.add_argument("--data-dir", default="data", help="as for training")
    args = p.parse_args(argv)
    run = Path(args.out)
    if (run / "checkpoint.npz").exists():
        raise UserError(f"{run} already holds a run; choose another --out")
    model, priors, image_hw = load_export(args.file)
    data = load_dataset(args.data, args.data_dir)
    if data.get("sample_rate"):
        raise UserError(f"{args.data} is speech; the models of {args.file} take images")
    if data["train"].shape[3] != model.cfg.in_channels:
        raise UserError(f"{args.data}: images of {data['train'].shape[3]} channels; the models of {args.file} take "
                        f"{model.cfg.in_channels}")
    num_classes = priors[0].cfg.num_classes if priors else 0
    if num_classes and ("train_labels" not in data or data["num_classes"] > num_classes):
        raise UserError(f"{args.file}: its prior knows {num_classes} classes; {args.data} has "
                        f"{data['num_classes'] or 'no'} labelled classes")
    hw = tuple(data["train"].shape[1:3])
    if image_hw is not None and tuple(image_hw) != hw:
        raise UserError(f"{args.file}: its models were trained on {image_hw[0]} x {image_hw[1]} images, "
                        f"{args.data}'s are {hw[0]} x {hw[1]}")
    cfg = TrainConfig(data=args.data, data_dir=args.data_dir, prior_labels=bool(num_classes))
    make_run_folder(run)
    with RunLock(run):
        save_checkpoint(run / "checkpoint.npz", model, vqvae.Adam(model.params), cfg.steps, 0.0)  # a finished stage
        for name, prior in zip(level_names(model), priors or []):
            save_checkpoint(run / f"{name}prior.npz", prior, vqvae.Adam(prior.params), cfg.prior_steps, 0.0,
                            vqvae_sha256=fingerprint(model), schedule_end=str(float(cfg.prior_steps)))
        prior_cfgs = [p.cfg for p in priors] if priors else prior_configs({}, model.cfg, num_classes, cfg.seed)
        save_json(run / "config.json", {"train": asdict(cfg), "model": asdict(model.cfg),
                                        "priors": [asdict(c) for c in prior_cfgs]})
        save_json(run / "summary.json", {"data": args.data, "image_hw": list(hw), "levels": model.cfg.levels,
                                         "imported_from": str(args.file), "steps": cfg.steps, "wall_time_s": 0.0,
                                         "vqvae_wall_time_s": 0.0})
    print(f"made {run} from {args.file}: the VQ-VAE" + (f" and {len(priors)} prior(s)" if priors else ", no prior")
          + f"; now: python train.py sample|evaluate|report --run {run}", file=sys.stderr)
    return 0
