"""The run folder: its files written whole or not at all, checkpoints that load without pickle,
one process at a time (RunLock), Ctrl-C that saves first, and the errors a user can act on.

    RUN/config.json      every setting (train, model, priors)     read_json, saved by train.py
    RUN/metrics.jsonl    a record a line                          read_metrics
    RUN/checkpoint.npz   the VQ-VAE, its Adam, its step           save_checkpoint, load_checkpoint
    RUN/prior.npz        a prior, its Adam, its step, and the SHA-256 of the VQ-VAE it was fitted to
    RUN/summary.json     the run's figures                        read_summary

Every file is written to a .tmp beside it and renamed into place (atomic_write): a crash or a
full disk leaves the previous file whole. Reading a damaged file gives one UserError that names it.
"""
import fcntl
import fnmatch
import hashlib
import io
import json
import math
import os
import signal
import socket
import struct
import tokenize
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

import prior
import vqvae


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 1, no traceback."""


class Interrupted(Exception):
    """Ctrl-C stopped a stage after its checkpoint was saved."""


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
# writing: whole files or nothing


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


def save_json(path, value):
    atomic_write(path, json.dumps(value, indent=2).encode())


def make_run_folder(run):
    if run.exists() and not run.is_dir():
        raise UserError(f"{run}: a file of that name is in the way of the run folder; choose another --out")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the run folder {run} ({e.strerror or e})")


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "evaluation.json", "report.html", "checkpoint.npz",
             "*prior.npz", "perceptual.npz", "judge_seed*.npz", "recon*.png", "samples.png", ".lock")  # a run's own


def check_output(path, flag, suffix=None, force=False):
    """A file a command will write: its folder must exist now, the name must not be a folder, it
    ends in the suffix of what will be written (a PNG named .jpg, or an .npz named .npy, would be
    read back wrong), it is not one of a run folder's own files (RUN_FILES, beside a config.json),
    and a file already there is written over only with force (--force)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    if suffix and path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: this writes {suffix[1:].upper()} data: give a name ending in {suffix}")
    if (path.parent / "config.json").is_file() and any(fnmatch.fnmatch(path.name, f) for f in RUN_FILES):
        raise UserError(f"{flag} {path}: a file of the run folder {path.parent}, which this command does not "
                        f"write; give another name")
    if path.exists() and not force:
        raise UserError(f"{flag} {path}: the file exists; give --force to write over it, or another name")


class RunLock:
    """RUN/.lock, held while a command writes into a run folder: a second process is refused, with
    the holder's host and process id. It is a POSIX record lock (fcntl.lockf, which NFS serves
    too), so the kernel lets go of it when the holder exits, however it ends: a killed run leaves
    no lock behind, only the file, which the next command takes over."""

    def __init__(self, run):
        self.path = Path(run) / ".lock"

    def __enter__(self):
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot open the run folder's lock {self.path} ({e.strerror or e})")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.path.parent} is in use by another process ({holder}); wait for it to end, "
                            f"or stop it")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()}, process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()                                              # closing lets go of the lock


def repair_metrics(path):
    """Cut a partial last line (what a kill or a full disk leaves) off metrics.jsonl, so that the
    next record does not glue onto it -> a note saying so, or None when the file is whole."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})")
    if not data or data.endswith(b"\n"):
        return None
    whole = data.rfind(b"\n") + 1                                     # the lines that are whole
    atomic_write(path, data[:whole])
    return f"{path}: its last line was cut short ({len(data) - whole} bytes, a killed run?): removed"


# -----------------------------------------------------------------------------
# checkpoints: a model, its optimiser, its step, in one .npz


CHECKPOINT_NOTES = ("vqvae_sha256", "schedule_end",  # a prior's: the VQ-VAE whose codes it was fitted to; a
                                                       # model's: the step its learning rate decays to its floor at;
                    "disc_scale")                      # an adversarial VQ-VAE's: its steered weight, w_t / w


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


def load_model(path, cls, device):
    """A trained model from a run's checkpoint (cls.load: VQVAE, PixelCNN, Judge), with a clear
    error for a missing or broken file."""
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
# reading: JSON and metrics


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


def read_summary(run):
    """A run's summary.json, with the figures that later commands compute with checked."""
    path = run / "summary.json"
    summary = read_json(path, "run summary")
    for key in ("vqvae_wall_time_s", "prior_wall_time_s"):
        if key in summary and not (isinstance(summary[key], (int, float)) and math.isfinite(summary[key])):
            raise UserError(f"{path}: {key} is {summary[key]!r}, not a number of seconds")
    hw = summary.get("image_hw")
    if hw is not None and not (isinstance(hw, list) and len(hw) == 2
                               and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**14 for v in hw)):
        raise UserError(f"{path}: image_hw is {hw!r}, not a height and a width (each at most {2**14})")
    return summary


def read_metrics(path):
    """metrics.jsonl -> its records: dicts with a stage (a string), a step (an integer that fits
    in 64 bits) and numbers (each a finite float, others left out). A line that is not one (the
    damaged last line of a killed run, a number too large for a float, nesting too deep) is skipped."""
    records = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not (isinstance(record, dict) and isinstance(record.get("stage"), str) and type(record.get("step")) is int
                and 0 <= record["step"] < 2 ** 63):
            continue
        numbers = {}
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("stage", "step"):
                try:
                    if math.isfinite(float(v)):
                        numbers[k] = float(v)
                except OverflowError:                                  # an integer of 400 digits
                    pass
        records.append({"stage": record["stage"], "step": record["step"], **numbers})
    return records


# -----------------------------------------------------------------------------
# a finished run's models


def load_trained(run, device, need_priors=True):
    """A finished run's VQ-VAE, its priors (each checked to be fitted to this VQ-VAE's codes)
    and the image size -> (model, priors or None, (h, w))."""
    model = load_model(run / "checkpoint.npz", vqvae.VQVAE, device)
    summary = read_summary(run) if (run / "summary.json").is_file() else {}
    if "image_hw" not in summary:
        raise UserError(f"{run}: no summary.json with the image size; finish the run first")
    vqvae_sha256, priors = fingerprint(model), []
    for name in (["top_", ""] if model.cfg.levels == 2 else [""]):
        path = run / f"{name}prior.npz"
        if path.exists() and not path.is_file():
            raise UserError(f"{path}: not a file (a folder?); remove it, then train the prior with "
                            f"python train.py --resume {run} --stage prior")
        if not path.is_file():
            if not need_priors:
                return model, None, tuple(summary["image_hw"])
            raise UserError(f"{run} has no {path.name} yet: train it with python train.py --resume {run} --stage prior")
        priors.append(load_model(path, prior.PixelCNN, device))
        K, cfg = model.cfg.level_num_codes, priors[-1].cfg
        if cfg.codebook_size != K[len(priors) - 1] or (len(priors) == 2 and cfg.cond_codebook_size != K[0]):
            raise UserError(f"{path} models {cfg.codebook_size} codes, the VQ-VAE has {K[len(priors) - 1]} at that "
                            f"level: it is not this run's prior; remove it, then train the priors with python train.py "
                            f"--resume {run} --stage prior")
        fitted_to = checkpoint_note(path, "vqvae_sha256")
        if fitted_to not in (None, vqvae_sha256) or (fitted_to is None and "stale_priors" in summary):
            raise UserError(f"{path} was fitted to the codes of an earlier state of the VQ-VAE in {run}/checkpoint.npz; "
                            f"train it anew with: python train.py --resume {run} --stage prior")
    return model, priors, tuple(summary["image_hw"])
