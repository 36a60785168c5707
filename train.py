"""Train a VQ-VAE, then a PixelCNN prior over its codes, then sample and measure: the two-stage recipe.

    python train.py                                 # built-in shapes data, both stages and the evaluation
    python train.py --levels 2 --data shapes64      # VQ-VAE-2 on 64 x 64 scenes (docs/vqvae2.md)
    python train.py --data mnist --steps 5000       # IDX files from --data-dir, downloaded if absent
    python train.py --data fsdd                     # spoken digits: the codec, then a prior that speaks (docs/audio.md)
    python train.py --resume runs/RUN               # continue a run exactly where it stopped
    python train.py encode --run runs/RUN --data mnist --out codes.npy   # the tokenizer
    python train.py sample --run runs/RUN --temperature 0.8
    python train.py evaluate --run runs/RUN --judge-seed 1   # the sample figures, with another judge
    python train.py report --run runs/RUN           # rebuild report.html
    python train.py export --run runs/RUN --out model.safetensors   # the weights, for PyTorch (docs/export.md)
    python train.py import --file tuned.safetensors --data shapes --out runs/TUNED   # and back, a run again
    python train.py decode --run runs/SPEECH --codes codes.npz --out wavs --speaker theo   # another voice

The settings are the fields of four dataclasses, each declared once with its help text:
config.TrainConfig (the run), vqvae.Config (the model), prior.PriorConfig (--prior-*) and, for
speech, audio.CodecConfig (--codec-*). The command line is built from them, so
`python train.py --help` lists every field that is a flag.
"""
import json
import math
import os
import sys
import time
from collections import namedtuple
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

import audio
import export
import prior as P
import speech
import vqvae
import vqgan
from codes import encode_all, level_names, prior_grid, prior_training_set
from config import DEVICES, DISC_BETAS, JUDGE_STEPS, TrainConfig, prior_configs, sampling_rule, saved_configs
from datasets import AUDIO, batch_indices, load_dataset, pad_to_multiple, to_model
from evaluation import evaluate, evaluate_prior, evaluate_samples, evaluation_table, perceptual_network
from report import draw_samples, recon_grid, write_png, write_recon_pictures, write_report
from runs import (CtrlC, Interrupted, RunLock, UserError, check_output, fingerprint, load_checkpoint,
                  load_model, load_trained, make_run_folder, read_summary, repair_metrics, save_checkpoint, save_json,
                  save_npy, save_npz)
from settings import ArgumentParser, SettingError, add_flags, check_value, flag, flag_message
from vqvae import lr_at


# -----------------------------------------------------------------------------
# the training loop both stages share


# what the loop needs of a stage: its name, a step's batch size, what training, evaluating and
# saving at a step do (functions of the step; save -> the checkpoint's path), that checkpoint
Stage = namedtuple("Stage", "name batch_size train evaluate save checkpoint")


def fit(stage, start, steps, cfg, xp, log, stop):
    """Steps start..steps of one stage. stage.train(step) trains on that step's batch and returns
    its stats as device scalars; they stay on the device until every log_every steps, when they
    come to the host in one sync. Every eval_every steps and at the end: stage.evaluate(step), then
    stage.save(step). A non-finite loss, gradient or state stops the run before anything
    non-finite is saved, saying which checkpoint holds the last good state (start > 0: the one
    resumed from). Returns the last evaluation; on Ctrl-C, saves and raises Interrupted."""
    window, step, ev = [], start, None
    t_log, step_log = time.time(), start
    saved = start if start > 0 else None                               # the step of stage.checkpoint, if any

    def kept():
        return (f"{stage.checkpoint} holds the last good state, step {saved}" if saved is not None else
                f"No checkpoint of this stage was saved (the first comes at step {min(cfg.eval_every, steps)})")

    def diverged(what):
        return UserError(f"{stage.name}: {what}; stopping. {kept()}. A lower learning rate may help")

    def logged(record, text, final):
        try:
            log(record, text, final)
        except UserError as e:                                         # a full disk, say
            raise UserError(f"{e}. {kept()}")

    def flush():
        nonlocal window, t_log, step_log
        if not window:
            return
        losses = vqvae.to_numpy(xp.stack([s["loss"] for s in window]))
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            raise diverged(f"the loss became {losses[bad[0]]} at step {step_log + bad[0] + 1}")
        keys = [k for k in window[0] if not k.endswith("codes")]       # scalars only
        mean = {k: float(np.mean(vqvae.to_numpy(xp.stack([s[k] for s in window])))) for k in keys}
        now = time.time()
        rate = len(window) * stage.batch_size / max(now - t_log, 1e-9)
        logged({"stage": stage.name, "step": step, **mean, "items_per_s": rate},
            f"{stage.name} {step}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in mean.items())
            + f" | {rate:.0f}/s ETA {(steps - step) * stage.batch_size / rate:.0f}s", final=False)
        window, t_log, step_log = [], now, step

    def save(s):
        nonlocal saved
        flush()                                                        # a bad loss stops before the save
        try:
            path = stage.save(s)
        except vqvae.NonFiniteError as e:
            raise diverged(f"at step {s}, {e}")
        except UserError as e:                                         # a full disk, say
            raise UserError(f"{e}. {kept()}")
        saved = s
        return path

    while step < steps and not stop.requested:
        try:
            window.append(stage.train(step))                          # forward, backward, Adam
        except vqvae.NonFiniteError as e:                              # the step changed nothing
            flush()
            raise diverged(f"at step {step + 1}, {e}")
        step += 1
        if step % cfg.log_every == 0:
            flush()
        if step % cfg.eval_every == 0 or step == steps:
            flush()
            try:
                ev = stage.evaluate(step)                              # writes a picture
            except UserError as e:                                     # a full disk, say
                raise UserError(f"{e}. {kept()}")
            save(step)
            logged({"stage": stage.name, "step": step, **ev}, f"{stage.name} {step}/{steps} held out: "
                + " ".join(f"{k} {v:.4g}" for k, v in ev.items()), final=True)
    if stop.requested:
        path = save(step)
        raise Interrupted(f"{stage.name} stage interrupted at step {step}, saved in {path}. "
                          f"Continue with: python train.py --resume {path.parent}")
    return stage.evaluate(step) if ev is None else ev                 # nothing left to train: just evaluate


def schedule_end(cfg, scale=1):
    """The step at which the prior's learning rate has decayed to a tenth: --prior-decay-steps, or
    (0) --prior-steps, times the prior's scale (the bottom prior of two levels: --bottom-prior-factor)."""
    return (cfg.prior_decay_steps or cfg.prior_steps) * scale


def prior_lr_at(cfg, step, scale=1):
    """The prior's learning rate at a step: --prior-lr after --prior-warmup steps, a tenth of it at
    --prior-decay-steps (and after: a run resumed with more --prior-steps trains on at that rate).
    A prior that trains `scale` times the steps (two levels' bottom one, --bottom-prior-factor)
    has both stretched alike."""
    return lr_at(step, cfg.prior_lr, cfg.prior_warmup * scale, schedule_end(cfg, scale), 0.1)


def vqvae_lr_at(cfg, step):
    """The VQ-VAE's (or the codec's) learning rate at a step: --lr after --lr-warmup steps, --lr-floor
    times it at --steps (the images' default: --lr throughout; the codec's: docs/audio.md)."""
    return lr_at(step, cfg.lr, cfg.lr_warmup, cfg.steps, cfg.lr_floor)


# -----------------------------------------------------------------------------
# the run: data, models, the VQ-VAE's stage, the priors' stage, what the run writes


def train(cfg, model_cfg, prior_settings, run, resuming):
    """Both stages, as cfg.stage asks, into the folder `run`, then the evaluation. Everything a run
    reads is checked before its first step: the settings, the data, and when resuming, every file
    of the folder; one process at a time trains into a folder (runs.RunLock)."""
    if isinstance(model_cfg, audio.CodecConfig):                       # speech: the audio codec's run
        return train_speech(cfg, model_cfg, prior_settings, run, resuming)
    if model_cfg.quantizer == "rvq" and model_cfg.levels == 2 and cfg.stage != "vqvae":
        raise UserError("the priors do not model two levels of residual codes (the bottom prior's conditioning "
                        "assumes one code per position): use --levels 1 with --quantizer rvq, or --stage vqvae")
    data, model_cfg, prior_cfgs = load_data(cfg, model_cfg, prior_settings, resuming)
    rule = sampling_rule(cfg, prior_cfgs)                              # how the samples at the end are drawn
    model, opt, gan = make_vqvae(cfg, model_cfg, data)
    make_run_folder(run)
    with RunLock(run):
        if resuming and (note := repair_metrics(run / "metrics.jsonl")):
            print(note, file=sys.stderr)
        summary, priors = train_stages(run, cfg, model_cfg, prior_cfgs, data, model, opt, gan, rule, resuming)
        if cfg.evaluate and cfg.stage != "vqvae":                      # a judge trained on the real images
            print(f"evaluating: a judge network trained on the {len(data['train'])} training images measures "
                  f"{min(cfg.eval_images, len(data['test']))} held-out images, their reconstructions and as many "
                  f"samples", file=sys.stderr)
            ev = evaluate_samples(run, model, priors, data, data["train"].shape[1:3], 0, cfg.judge_steps,
                                  cfg.eval_images, cfg.seed + 1, rule, cfg.device, cfg.two_sample_steps)
            save_json(run / "evaluation.json", ev)
            print(evaluation_table(ev), file=sys.stderr)
            save_json(run / "summary.json", {**summary, "evaluate_time_s": ev["evaluate_time_s"], **{
                k: v for k, v in ev.items() if k.startswith(("fd_", "accuracy_", "precision_", "recall_", "c2st_"))}})
        write_report(run)
    print(f"done: {run}/report.html, summary.json, recon.png" + (", samples.png" if priors else "")
          + (", evaluation.json" if cfg.evaluate and cfg.stage != "vqvae" else ""), file=sys.stderr)
    return 0


def train_stages(run, cfg, model_cfg, prior_cfgs, data, model, opt, gan, rule, resuming):
    """The VQ-VAE's stage and the priors' (and the samples), as cfg.stage asks -> (the summary,
    written to summary.json, and the priors or None)."""
    if cfg.perceptual_weight:                                          # the network the perceptual term reads
        gan.net = perceptual_network(run, data, cfg.seed + 1000, cfg.perceptual_steps, cfg.device)
    step, wall, summary_before = resume_vqvae(run, cfg, model, opt, gan) if resuming else (0, 0.0, {})
    vqvae_trains = cfg.stage in ("vqvae", "all") and step < cfg.steps
    levels, stale = read_priors(run, cfg, prior_cfgs, model, resuming, summary_before, vqvae_trains)
    save_json(run / "config.json", {"train": asdict(cfg), "model": asdict(model_cfg),
                                    "priors": [asdict(c) for c in prior_cfgs]})
    device, num_classes, real_hw = "gpu" if model.xp is not np else "cpu", prior_cfgs[0].num_classes, data["train"].shape[1:3]
    print(f"{run}: {cfg.data} {data['train_padded'].shape[1:]} ({len(data['train'])} train, {len(data['test'])} "
          f"held out), VQ-VAE with {sum(p.size for p in model.params.values()):,} parameters, device {device}"
          + (f", resuming at step {step}" if resuming else ""), file=sys.stderr)
    summary, priors = {"data": cfg.data, "image_hw": list(real_hw), "device": device, "levels": model_cfg.levels,
                       "quantizer": model_cfg.quantizer, "adversarial": cfg.adversarial}, None
    with open(run / "metrics.jsonl", "ab", buffering=0) as metrics, CtrlC() as stop:  # unbuffered: a failed write
                                                                                       # leaves nothing to flush
        log = metrics_log(run, metrics)
        if cfg.stage in ("vqvae", "all"):                              # stage 1: the VQ-VAE
            summary.update(train_vqvae(run, cfg, data, model, opt, gan, step, wall, log, stop))
        else:
            summary.update(evaluate(model, data["test_padded"], real_hw, cfg.batch_size), steps=cfg.steps,
                           vqvae_wall_time_s=wall)
        write_recon_pictures(run, model, data)
        if cfg.stage in ("prior", "all"):                              # stage 2: the priors over its codes
            priors, figures = train_priors(run, cfg, model, levels, *image_code_sets(model, data, cfg, num_classes),
                                           log, stop)
            grid, _, seconds = draw_samples(model, priors, num_classes or 4, 8, cfg.seed, rule, real_hw)
            write_png(run / "samples.png", grid)
            summary.update(figures, sample_time_s=seconds, samples=(num_classes or 4) * 8)
    summary = merge_summary(summary_before, summary, cfg.stage, stale)
    save_json(run / "summary.json", summary)
    return summary, priors


def load_data(cfg, model_cfg, prior_settings, resuming):
    """The dataset, its splits also edge-padded to the model's multiple ('train_padded',
    'test_padded'), checked against the settings -> (data, the model's config with the data's
    channels, the priors' configs: the saved ones when resuming, else made from the settings)."""
    data = load_dataset(cfg.data, cfg.data_dir)
    C = data["train"].shape[3]
    if C != model_cfg.in_channels:
        if resuming:
            raise UserError(f"{cfg.data} has {C} channels, the run's model expects {model_cfg.in_channels}")
        model_cfg = replace(model_cfg, in_channels=C)
    for split in ("train", "test"):
        data[f"{split}_padded"] = pad_to_multiple(data[split], model_cfg.downsample)
    for name in ("batch_size", "prior_batch_size"):
        if getattr(cfg, name) > len(data["train"]):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is larger than the "
                            f"{len(data['train'])} training images")
    labelled = data["num_classes"] > 0 and "train_labels" in data
    prior_cfgs = prior_settings if resuming else prior_configs(
        prior_settings, model_cfg, data["num_classes"] if cfg.prior_labels and labelled else 0, cfg.seed)
    num_classes = prior_cfgs[0].num_classes
    if num_classes and not labelled:
        raise UserError(f"the run's prior is class-conditional, but {cfg.data} has no labels")
    for split in ("train_labels", "test_labels"):
        if num_classes and not (data[split].min() >= 0 and data[split].max() < num_classes):
            raise UserError(f"{cfg.data}: {split} lie in [{data[split].min()}, {data[split].max()}], outside the "
                            f"prior's {num_classes} classes")
    return data, model_cfg, prior_cfgs


def make_vqvae(cfg, model_cfg, data):
    """The VQ-VAE and its Adam, and for VQGAN's losses the VQGAN that holds it: with --adversarial
    its discriminator (gan.disc) and the discriminator's Adam (gan.disc_opt)."""
    model = vqvae.make_model(model_cfg, device=cfg.device)
    opt = vqvae.Adam(model.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if not (cfg.adversarial or cfg.l1_weight or cfg.perceptual_weight):
        return model, opt, None
    disc = None
    if cfg.adversarial:
        init = vqvae.uniform_init(np.random.default_rng([cfg.seed, 1]), model.xp, model_cfg.dtype)  # a stream of its
        disc = vqgan.PatchDiscriminator(model_cfg.in_channels, cfg.disc_width, cfg.disc_layers, init=init)  # own
        H, W = data["train_padded"].shape[1:3]
        if min(disc.patches(H, W)) < 1:
            raise UserError(f"--disc-layers {cfg.disc_layers} leaves no patch of a {H} x {W} image to judge: give fewer")
    gan = vqgan.VQGAN(model, disc, cfg.disc_weight, cfg.disc_start, cfg.l1_weight, cfg.perceptual_weight,
                      target=cfg.disc_target or None)            # 0: VQGAN's w, held
    gan.disc_opt = vqvae.Adam(disc.params, lr=cfg.disc_lr, betas=DISC_BETAS) if disc is not None else None
    return model, opt, gan


def resume_vqvae(run, cfg, model, opt, gan):
    """The VQ-VAE (and its Adam, and --adversarial's discriminator) from RUN/checkpoint.npz
    -> (its step, seconds so far, the summary of the run so far)."""
    step, wall, notes = load_checkpoint(run / "checkpoint.npz", model, opt, *gan_parts(gan))
    if gan is not None and "disc_scale" in notes:
        gan.scale = float(notes["disc_scale"])                         # where --disc-target had steered w to
    if cfg.steps < step:
        raise UserError(f"the VQ-VAE of {run} is at step {step}: --steps {cfg.steps} would go back; "
                        f"give --steps {step} or more")
    trained_to = float(notes.get("schedule_end", cfg.steps))          # where its learning rate reaches the floor
    if cfg.lr_floor != 1 and trained_to != cfg.steps and step > cfg.lr_warmup:
        raise UserError(f"the VQ-VAE of {run} trained {step} steps of a learning rate that decays to "
                        f"{cfg.lr_floor:g} of --lr at step {trained_to:g}; --steps {cfg.steps} would follow another "
                        f"schedule than the steps already trained: give --steps {trained_to:g}, or train a new run")
    if cfg.stage == "prior" and step < cfg.steps:
        raise UserError(f"the VQ-VAE of {run} stopped at step {step} of {cfg.steps}: finish it first "
                        f"(--resume {run} --stage vqvae)")
    return step, wall, read_summary(run) if (run / "summary.json").exists() else {}


def gan_parts(gan):
    """(discriminator, its Adam) of a VQGAN or of the codec's audio.SpectrogramAdversary, saved in the
    checkpoint beside the model; (None, None) without."""
    return (gan.disc, gan.disc_opt) if gan is not None and gan.disc is not None else (None, None)


def prior_steps(cfg, model, name):
    """(training steps, schedule scale) of the prior `name`: --prior-steps, or for the bottom prior of
    two levels --bottom-prior-factor times as many, its warm-up and decay alike."""
    scale = cfg.bottom_prior_factor if model.cfg.levels == 2 and name == "prior" else 1
    return round(cfg.prior_steps * scale), scale


def read_priors(run, cfg, prior_cfgs, model, resuming, summary_before, vqvae_trains):
    """Each level's prior with its Adam, step and time so far, read now so that a broken file stops
    the run before any training. A prior fitted to the codes of another state of the VQ-VAE (one
    that trains on now, or another one) is trained anew, never continued.
    -> ([(name, prior, Adam, start, seconds)], the note on stale priors or None)"""
    current = None if vqvae_trains else fingerprint(model)
    levels, stale = [], []
    for name, prior_cfg in zip(level_names(model), prior_cfgs):
        name += "prior"                                                # 'top_prior', 'prior'
        prior = P.PixelCNN(prior_cfg, device=cfg.device)
        prior_opt, start, seconds = vqvae.Adam(prior.params, lr=cfg.prior_lr), 0, 0.0
        if resuming and (run / f"{name}.npz").exists():
            start, seconds, notes = load_checkpoint(run / f"{name}.npz", prior, prior_opt)
            fitted_to = notes.get("vqvae_sha256")                      # absent in priors saved before it was kept
            steps, scale = prior_steps(cfg, model, name)
            trained_to = float(notes.get("schedule_end", schedule_end(cfg, scale)))  # the end of its schedule so far
            if vqvae_trains or fitted_to not in (None, current) or (fitted_to is None and "stale_priors" in summary_before):
                stale.append(f"{name}.npz")
                prior = P.PixelCNN(prior_cfg, device=cfg.device)
                prior_opt, start, seconds = vqvae.Adam(prior.params, lr=cfg.prior_lr), 0, 0.0
            elif start > steps:
                raise UserError(f"{run / name}.npz is at step {start}: --prior-steps {cfg.prior_steps} would go "
                                f"back; give --prior-steps {math.ceil(start / scale)} or more")
            elif trained_to != schedule_end(cfg, scale) and start > cfg.prior_warmup * scale:
                raise UserError(f"{run / name}.npz trained {start} steps of a learning rate that decays to a tenth "
                                f"at step {trained_to:g}; --prior-steps {cfg.prior_steps} moves that end to "
                                f"{schedule_end(cfg, scale):g}, which the steps already trained did not follow, so the "
                                f"prior would not be what a run of that length trains. Give the --prior-steps it was "
                                f"started with, or train it anew: remove {run / name}.npz and resume with --stage prior")
        levels.append((name, prior, prior_opt, start, seconds))
    if not stale:
        return levels, None
    if cfg.stage == "vqvae":
        note = (f"{' and '.join(stale)} and samples.png come from the codes of an earlier state of the VQ-VAE; "
                f"train the priors anew with: python train.py --resume {run} --stage prior")
    else:
        note = f"{' and '.join(stale)} came from the codes of an earlier state of the VQ-VAE: trained anew"
    print(f"{run}: {note}", file=sys.stderr)
    return levels, note


def metrics_log(run, metrics):
    """log(record, text, final): a line of metrics.jsonl and of progress; a held-out evaluation
    (final) also rewrites report.html, so that the page has its new points."""
    live = sys.stderr.isatty()                                         # one live line on a terminal, else lines

    def log(record, text, final):
        try:
            metrics.write((json.dumps(record) + "\n").encode())
        except OSError as e:                                           # a full disk, say
            raise UserError(f"cannot write {run / 'metrics.jsonl'} ({e.strerror or e})")
        sys.stderr.write(("\r\033[K" + text + ("\n" if final else "")) if live else text + "\n")
        sys.stderr.flush()
        if final:
            write_report(run)
    return log


def train_vqvae(run, cfg, data, model, opt, gan, step, wall, log, stop):
    """Stage 1: the VQ-VAE from `step` to cfg.steps -> its held-out figures, steps and seconds."""
    images, test, real_hw = data["train_padded"], data["test_padded"], data["train"].shape[1:3]
    t_start = time.time()

    def train_step(s):
        x = to_model(images[batch_indices(cfg.seed, s, len(images), cfg.batch_size)])
        opt.lr = vqvae_lr_at(cfg, s)
        if gan is not None:                                            # VQGAN's losses, D from disc_start
            return gan.train_step(x, opt, gan.disc_opt, s)
        return model.train_step(x, opt)                                # forward, backward, Adam

    def held_out(s):
        write_png(run / f"recon_{s:06d}.png", recon_grid(model, test, real_hw))
        return evaluate(model, test, real_hw, cfg.batch_size)

    def save(s):
        notes = {"disc_scale": repr(gan.scale)} if gan is not None and gan.disc is not None else {}
        return save_checkpoint(run / "checkpoint.npz", model, opt, s, wall + time.time() - t_start, *gan_parts(gan),
                               schedule_end=str(float(cfg.steps)), **notes)

    stage = Stage("vqvae", cfg.batch_size, train_step, held_out, save, run / "checkpoint.npz")
    ev = fit(stage, step, cfg.steps, cfg, model.xp, log, stop)
    return {**ev, "steps": cfg.steps, "vqvae_wall_time_s": wall + time.time() - t_start}


def image_code_sets(model, data, cfg, num_classes):
    """The priors' training and held-out sets of images: ((a code grid per level), labels or None) each."""
    print(f"encoding {len(data['train']) * (1 + cfg.prior_flip) + len(data['test'])} images to codes"
          + (" (the training images also mirrored)" if cfg.prior_flip else ""), file=sys.stderr)
    train_set = prior_training_set(model, data["train_padded"], data["train_labels"] if num_classes else None,
                                   cfg.prior_flip)
    return train_set, (tuple(map(prior_grid, encode_all(model, data["test_padded"]))),
                       data["test_labels"] if num_classes else None)


def train_priors(run, cfg, model, levels, train_set, test_set, log, stop, voices=(None, None)):
    """Stage 2: a PixelCNN over each level's codes, coarsest first, the bottom one given the top
    codes; each set is ((a code grid per level), labels or None); `voices`, the speaker grids of the
    train and test sets where speech's prior is told them (speech.speaker_grids) -> (the priors,
    their figures and seconds)."""
    vqvae_sha256 = fingerprint(model)                                  # recorded in each prior's checkpoint
    (codes_train, labels_train), (codes_test, labels_test) = train_set, test_set
    priors, figures, seconds_all = [], {}, 0.0
    for level, (name, prior, opt, start, seconds) in enumerate(levels):
        codes, cond = codes_train[level], codes_train[level - 1] if level else voices[0]
        steps, scale = prior_steps(cfg, model, name)
        t_start = time.time()

        def train_step(s):
            opt.lr = prior_lr_at(cfg, s, scale)
            idx = batch_indices(cfg.seed + 1 + level, s, len(codes), cfg.prior_batch_size)
            return prior.train_step(codes[idx], opt, None if labels_train is None else labels_train[idx],
                                    cond_codes=None if cond is None else cond[idx])

        def held_out(s):
            return evaluate_prior(prior, codes_test[level], labels_test, codes_test[level - 1] if level else voices[1],
                                  cfg.prior_batch_size, name)

        def save(s):
            return save_checkpoint(run / f"{name}.npz", prior, opt, s, seconds + time.time() - t_start,
                                   vqvae_sha256=vqvae_sha256, schedule_end=str(schedule_end(cfg, scale)))

        stage = Stage(name, cfg.prior_batch_size, train_step, held_out, save, run / f"{name}.npz")
        figures.update(fit(stage, start, steps, cfg, model.xp, log, stop), **{f"{name}_steps": steps})
        seconds_all += seconds + time.time() - t_start
        priors.append(prior)
    return priors, {**figures, "prior_wall_time_s": seconds_all}


def train_speech(cfg, codec_cfg, prior_settings, run, resuming):
    """Speech: the audio codec (audio.py) on clips cut from the training recordings, measured at
    every number of stages on the held-out recordings (stage 1); then a prior over the codes of its
    first --prior-stages stages, digits spoken from it, and clips converted to other voices (stage 2)."""
    data = load_dataset(cfg.data, cfg.data_dir)
    codec_cfg = speech.checked_config(cfg, codec_cfg, data, resuming)
    model = audio.Codec(codec_cfg, device=cfg.device)
    if model.adversary is not None and min(model.adversary.patches(cfg.crop_samples)) < 1:
        raise UserError(f"--crop-samples {cfg.crop_samples} is too short for the discriminator: its spectrogram at "
                        f"window {codec_cfg.disc_window} leaves no patch to judge; give longer crops or a shorter "
                        f"--codec-disc-window")
    if model.listener is not None and cfg.crop_samples < model.listener.window:
        raise UserError(f"--crop-samples {cfg.crop_samples} is too short for the speaker listener: it hears "
                        f"spectrograms at window {model.listener.window}; give at least that")
    opt = vqvae.Adam(model.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    prior_cfgs = (prior_settings if resuming else []) or prior_configs(  # a run from before the prior: made now
        {} if resuming else prior_settings, codec_cfg, data["num_classes"] if cfg.prior_labels else 0, cfg.seed)
    rule = sampling_rule(cfg, prior_cfgs, "audio")
    make_run_folder(run)
    with RunLock(run):
        step, wall, before = 0, 0.0, {}
        if resuming:
            if note := repair_metrics(run / "metrics.jsonl"):
                print(note, file=sys.stderr)
            step, wall, before = resume_vqvae(run, cfg, model, opt, model.adversary)
        codec_trains = cfg.stage in ("vqvae", "all") and step < cfg.steps
        levels, _ = read_priors(run, cfg, prior_cfgs, model, resuming, before, codec_trains)
        save_json(run / "config.json", {"train": asdict(cfg), "codec": asdict(codec_cfg),
                                        "priors": [asdict(c) for c in prior_cfgs]})
        print(f"{run}: {cfg.data} ({len(data['train'])} train, {len(data['test'])} held-out clips at "
              f"{data['sample_rate']} Hz), codec with {sum(p.size for p in model.params.values()):,} parameters, "
              f"{codec_cfg.hop} samples a frame, {codec_cfg.stages} stages of {codec_cfg.codebook_size} codes: "
              f"{codec_cfg.bitrate(1):g} to {codec_cfg.bitrate(codec_cfg.stages):g} bits/s"
              + (f", resuming at step {step}" if resuming else ""), file=sys.stderr)
        summary = {**before, "data": cfg.data, "device": "gpu" if model.xp is not np else "cpu"}
        with open(run / "metrics.jsonl", "ab", buffering=0) as metrics, CtrlC() as stop:
            log = metrics_log(run, metrics)
            if cfg.stage in ("vqvae", "all"):                          # stage 1: the codec
                summary.update(train_codec(run, cfg, data, model, opt, step, wall, log, stop))
                summary.update(speech.measure_codec(run, model, data, cfg.evaluate and cfg.judge_steps, cfg.device))
            if cfg.stage in ("prior", "all"):                          # stage 2: the prior over its codes
                print(f"encoding {len(data['train']) + len(data['test'])} clips to {cfg.prior_frames} frames of "
                      f"{cfg.prior_stages} stages", file=sys.stderr)
                sets = [((speech.prior_grids(model, data[split], cfg.prior_stages, cfg.prior_frames),),
                         data[f"{split}_labels"] if prior_cfgs[0].num_classes else None) for split in ("train", "test")]
                voices = [speech.speaker_grids(data[f"{split}_speakers"], cfg.prior_frames, cfg.prior_stages)
                          if prior_cfgs[0].cond_codebook_size else None for split in ("train", "test")]
                priors, figures = train_priors(run, cfg, model, levels, *sets, log, stop, voices)
                summary.update(figures, **speech.measure_prior(run, model, priors[0], data, cfg, rule))
        summary["wall_time_s"] = summary["vqvae_wall_time_s"] + summary.get("prior_wall_time_s", 0.0)
        save_json(run / "summary.json", summary)
        print(speech.codec_table(summary), file=sys.stderr)
        write_report(run)
    print(f"done: {run}/report.html, summary.json, spectrograms.png, audio/"
          + (", samples/" if cfg.stage != "vqvae" else ""), file=sys.stderr)
    return 0


def train_codec(run, cfg, data, model, opt, step, wall, log, stop):
    """Stage 1 of speech: the codec from `step` to cfg.steps, each batch with quantizer dropout's n_q
    -> its held-out figures, steps and seconds."""
    held = data["test"][::5]                                           # every fifth held-out clip, while training
    conditioned = bool(model.cfg.speakers)
    t_start = time.time()

    def train_step(s):
        opt.lr = vqvae_lr_at(cfg, s)
        x, idx = speech.crops(data["train"], cfg.seed, s, cfg.batch_size, cfg.crop_samples)
        return model.train_step(x, opt, model.dropout_stages(cfg.seed, s),  # quantizer dropout: n_q of this step
                                data["train_speakers"][idx] if conditioned else None,
                                adversarial=model.adversary is not None and s >= model.cfg.adversarial_start)

    def held_out(s):
        recons, codes = speech.reconstruct_clips(model, held, [model.cfg.stages],
                                                 data["test_speakers"][::5] if conditioned else None)
        rows, _ = speech.codec_figures(model.cfg, held, recons, codes)
        return {"val_si_snr_db": rows[0]["si_snr_db"], "val_log_mel_distance": rows[0]["log_mel_distance"]}

    def save(s):
        return save_checkpoint(run / "checkpoint.npz", model, opt, s, wall + time.time() - t_start,
                               *gan_parts(model.adversary), schedule_end=str(float(cfg.steps)))

    ev = fit(Stage("codec", cfg.batch_size, train_step, held_out, save, run / "checkpoint.npz"), step, cfg.steps,
             cfg, model.xp, log, stop)
    return {**ev, "steps": cfg.steps, "vqvae_wall_time_s": wall + time.time() - t_start}


def merge_summary(before, summary, stage, stale):
    """summary.json: a later stage adds to an earlier one's figures; figures of priors that no
    longer fit the VQ-VAE leave it, with a note; wall_time_s is both stages' training."""
    summary = {**before, **summary}
    if stale and stage == "vqvae":
        summary = {k: v for k, v in summary.items() if not ("prior" in k or k in ("sample_time_s", "samples"))}
        summary["stale_priors"] = stale
    elif stage != "vqvae":
        summary.pop("stale_priors", None)
    summary["wall_time_s"] = summary["vqvae_wall_time_s"] + summary.get("prior_wall_time_s", 0.0)
    return summary


# -----------------------------------------------------------------------------
# the command line, built from the settings' declarations


SECTIONS = ((TrainConfig, "", "the run, training, sampling and evaluation (config.TrainConfig)"),
            (vqvae.Config, "", "the model (vqvae.Config; the descendants' quantizers: quantizers.py)"),
            (P.PriorConfig, "prior_", "the prior (prior.PriorConfig)"),
            (audio.CodecConfig, "codec_", "speech, --data fsdd: the audio codec (audio.CodecConfig)"))
FLAGS = {prefix + f.name: (cls, f) for cls, prefix, _ in SECTIONS for f in fields(cls) if f.metadata.get("help")}
SPEECH_FLAGS = ("data", "data_dir", "stage", "seed", "device", "log_every", "eval_every", "steps", "batch_size",
                "lr", "lr_warmup", "lr_floor", "adam_beta1", "adam_beta2", "evaluate", "judge_steps", "prior_steps",
                "prior_batch_size", "prior_lr", "prior_warmup", "prior_decay_steps", "prior_labels", "temperature",
                "top_k", "top_p", "guidance")                          # TrainConfig's for speech, and PriorConfig's
SPEECH_ONLY = ("crop_samples", "prior_stages", "prior_frames")         # TrainConfig's for speech only, and CodecConfig's


def build_parser():
    p = ArgumentParser(prog="train.py", description="Train a VQ-VAE (van den Oord et al. 2017), then a PixelCNN "
                                                    "prior over its codes, and sample and measure new images.",
                       epilog="Subcommands: encode, decode, sample, evaluate, report, export, import "
                              "('python train.py sample --help').")
    run = p.add_argument_group("run folder")
    run.add_argument("--out", default=None, help="the run folder (default: runs/<data>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR")
    for cls, prefix, title in SECTIONS:
        add_flags(p.add_argument_group(title), cls, prefix)
    return p


def configs_from_args(args):
    """(TrainConfig, vqvae.Config, the priors' settings, run folder, resuming?) from the parsed
    flags, or from a run folder's config.json when resuming (the settings are then the saved
    PriorConfigs, one per level)."""
    given = {dest: v for dest, v in vars(args).items() if v is not None and dest in FLAGS}
    for dest, v in given.items():                                      # each value as its field allows
        try:
            given[dest] = check_value(FLAGS[dest][1], v) if FLAGS[dest][1].type is not tuple else v
        except SettingError as e:
            raise UserError(flag_message(e, dest[:-len(e.name)]))
    if args.resume:
        return resumed_configs(Path(args.resume), given)
    if args.stage == "prior":
        raise UserError("--stage prior trains a prior for an existing run: add --resume RUN_DIR")
    kw = {cls: {f.name: given[prefix + f.name] for f in fields(cls) if FLAGS.get(prefix + f.name, (None,))[0] is cls
                and prefix + f.name in given} for cls, prefix, _ in SECTIONS}
    try:
        cfg = TrainConfig(**kw[TrainConfig])
    except SettingError as e:
        raise UserError(flag_message(e))
    speech_run = cfg.data in AUDIO
    for dest in given:                                                 # images' flags with speech, or the reverse
        speech_only = FLAGS[dest][0] is audio.CodecConfig or dest in SPEECH_ONLY
        speech_too = dest in SPEECH_FLAGS or FLAGS[dest][0] is P.PriorConfig
        if (speech_only and not speech_run) or (speech_run and not (speech_only or speech_too)):
            raise UserError(f"{flag(dest)} applies to {'images' if speech_run else 'speech (--data fsdd)'}, "
                            f"not to --data {cfg.data}")
    model_cls, prefix = (audio.CodecConfig, "codec_") if speech_run else (vqvae.Config, "")
    try:
        model_cfg = model_cls(**kw[model_cls], seed=cfg.seed)
    except SettingError as e:
        raise UserError(flag_message(e, prefix))
    for dest in given:                                                 # a setting that applies elsewhere only
        only = FLAGS[dest][1].metadata.get("only")
        if only and getattr(model_cfg, only[0]) not in only[1]:
            raise UserError(f"{flag(dest)} {given[dest]} applies to {flag(only[0])} "
                            f"{'|'.join(map(str, only[1]))} only: add {flag(only[0])} {only[1][0]}")
    run = Path(args.out or f"runs/{Path(cfg.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run / "checkpoint.npz").exists():
        raise UserError(f"{run} already holds a run; continue it with --resume {run}, or choose another --out")
    return cfg, model_cfg, kw[P.PriorConfig], run, False


def resumed_configs(run, given):
    """A run folder's saved configs, with the resumable flags given again; any other flag that
    differs from the saved setting is refused."""
    cfg, model_cfg, priors = saved_configs(run)
    prefix = "codec_" if isinstance(model_cfg, audio.CodecConfig) else ""
    saved = {**asdict(cfg), **{prefix + k: v for k, v in asdict(model_cfg).items()}}
    if priors:
        saved.update({f"prior_{k}": v for k, v in asdict(priors[0]).items()},
                     prior_cond_blocks=priors[-1].cond_blocks)         # the bottom prior's setting
    resumable = {dest for dest, (cls, f) in FLAGS.items() if f.metadata.get("resumable")}
    changed = sorted(dest for dest in set(given) - resumable if given[dest] != saved.get(dest))
    if changed:
        raise UserError(f"cannot change {', '.join(map(flag, changed))} when resuming; only "
                        f"{', '.join(map(flag, sorted(resumable)))} may")
    try:
        cfg = replace(cfg, **{dest: v for dest, v in given.items() if dest in resumable})
    except SettingError as e:
        raise UserError(flag_message(e))
    return cfg, model_cfg, priors, run, True


# -----------------------------------------------------------------------------
# the subcommands: the tokenizer, the sampler, the evaluation, the report


SAMPLING = ("temperature", "top_k", "top_p", "guidance")              # TrainConfig's, for `sample` and `evaluate`


def subcommand(prog, description, *flags, sampling=False):
    """A subcommand's parser with --run and --device, (name, kwargs) flags of its own, and with
    sampling, --seed and the sampling flags."""
    p = ArgumentParser(prog=f"train.py {prog}", description=description)
    p.add_argument("--run", required=True, help="the run folder")
    p.add_argument("--device", default="auto", choices=DEVICES, help="gpu needs CuPy")
    for name, kw in flags + ((("--seed", dict(type=int, default=0, help="seed of the sampling")),) if sampling else ()):
        p.add_argument(name, **kw)
    if sampling:
        add_flags(p, TrainConfig, names=SAMPLING)
    return p


def at_least(args, **lows):
    """Each named count of the parsed flags at least its low, or a UserError that names it."""
    for name, low in lows.items():
        if getattr(args, name) < low:
            raise UserError(f"{flag(name)} must be at least {low}, got {getattr(args, name)}")


def encode(argv):
    """Write the integer codes of a dataset split with a trained model: the tokenizer."""
    args = subcommand("encode", "Encode a dataset to integer codes.",
                      ("--data", dict(required=True, help="as for training")),
                      ("--data-dir", dict(default="data", help="as for training")),
                      ("--split", dict(default="test", choices=["train", "test"], help="which split to encode")),
                      ("--out", dict(required=True, help="output .npy of codes (N, h, w), residual VQ's (N, S, h, w); "
                                                         "for two levels an .npz with arrays 'top' and 'bottom'; for "
                                                         "speech an .npz: 'codes' (N, S, frames), padded with -1 after "
                                                         "each clip's 'frames', and 'names'")),
                      ("--force", dict(action="store_true", help="write over --out if it exists"))).parse_args(argv)
    if is_speech_run(Path(args.run)):
        return speech.encode_clips(args)
    model = load_model(Path(args.run) / "checkpoint.npz", vqvae.VQVAE, args.device)
    check_output(args.out, "--out", ".npy" if model.cfg.levels == 1 else ".npz", args.force)  # before the data is read
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


def is_speech_run(run):
    """Whether the run folder holds the audio codec (its config.json has a 'codec' part)."""
    return isinstance(saved_configs(run)[1], audio.CodecConfig)


def decode_command(argv):
    """Speech: codes written by `encode` (or a prior) -> a WAV file per clip (speech.decode_clips)."""
    args = subcommand("decode", "Decode a speech run's codes to WAV files.",
                      ("--codes", dict(required=True, help="an .npz from `train.py encode`")),
                      ("--stages", dict(type=int, default=0, help="decode from the first n stages only (0: all)")),
                      ("--speaker", dict(help="decode every clip in this speaker's voice, one the codec was trained "
                                              "with (default: each clip's own, from its name digit_speaker_index)")),
                      ("--out", dict(required=True, help="the folder to write <name>.wav into (made if absent)")),
                      ("--force", dict(action="store_true", help="write over WAV files there"))).parse_args(argv)
    if not is_speech_run(Path(args.run)):
        raise UserError(f"{args.run}: decode turns a speech run's codes into WAV files; this run is of images")
    at_least(args, stages=0)
    return speech.decode_clips(args)


def sample(argv):
    """Draw new images from a finished run: codes from the priors, decoded by the VQ-VAE."""
    args = subcommand("sample", "Sample new images from a trained run.",
                      ("--out", dict(help="PNG to write (default: RUN/samples_seed<seed>.png)")),
                      ("--codes-out", dict(help="also write the sampled codes to this .npz (one array a level)")),
                      ("--per-row", dict(type=int, default=8, help="samples per row (a row per class if conditional)")),
                      ("--rows", dict(type=int, default=4, help="rows, for an unconditional prior")),
                      ("--force", dict(action="store_true", help="write over the output files if they exist")),
                      sampling=True).parse_args(argv)
    at_least(args, per_row=1, rows=1, seed=0)
    sampling_rule(args, [])                                            # the numbers, before anything is read
    run = Path(args.run)
    if is_speech_run(run):
        raise UserError(f"{run} holds the audio codec: its run spoke digits from its prior at the end (samples/); "
                        f"codes turn into WAV files with: python train.py decode; this command samples images")
    out = Path(args.out or run / f"samples_seed{args.seed}.png")
    for name, path, suffix in (("--out", out, ".png"), ("--codes-out", args.codes_out, ".npz")):
        check_output(path, name, suffix, args.force)
    with RunLock(run):
        model, priors, real_hw = load_trained(run, args.device)
        grid, codes, seconds = draw_samples(model, priors, priors[0].cfg.num_classes or args.rows, args.per_row,
                                            args.seed, sampling_rule(args, [p.cfg for p in priors]), real_hw)
        write_png(out, grid)
        if args.codes_out:
            save_npz(args.codes_out, {f"{name}codes": c for name, c in zip(level_names(model), codes)})
    print(f"wrote {out}: {len(codes[0])} samples, codes sampled in {seconds:.2f}s", file=sys.stderr)
    return 0


def evaluate_command(argv):
    """Measure a finished run: its judge (trained once on the run's training split, then kept
    in the run folder), held-out images, their reconstructions and new samples."""
    args = subcommand("evaluate", "Measure a run's reconstructions and samples with a judge network trained on "
                                  "the real training images.",
                      ("--judge-seed", dict(type=int, default=0, help="seed of the judge (its initialisation, batches)")),
                      ("--judge-steps", dict(type=int, default=JUDGE_STEPS["images"], help="the judge's training steps")),
                      ("--two-sample-steps", dict(type=int, default=TrainConfig.two_sample_steps,
                                                  help="training steps of each two-sample test (0: none)")),
                      ("--images", dict(type=int, default=TrainConfig.eval_images,
                                        help="held-out images measured, and as many samples")),
                      sampling=True).parse_args(argv)
    at_least(args, judge_seed=0, judge_steps=1, two_sample_steps=0, images=2, seed=0)
    sampling_rule(args, [])                                            # the numbers, before anything is read
    run = Path(args.run)
    cfg, model_cfg, _ = saved_configs(run)
    if isinstance(model_cfg, audio.CodecConfig):
        raise UserError(f"{run} holds the audio codec: its run measured it at the end (summary.json: per number of "
                        f"stages, and the prior's samples); this command measures a run of images")
    with RunLock(run):
        model, priors, real_hw = load_trained(run, args.device, need_priors=False)
        ev = evaluate_samples(run, model, priors, load_dataset(cfg.data, cfg.data_dir), real_hw, args.judge_seed,
                              args.judge_steps, args.images, args.seed, sampling_rule(args, [p.cfg for p in priors or []]),
                              args.device, args.two_sample_steps)
        save_json(run / "evaluation.json", ev)
        write_report(run)
    print(evaluation_table(ev))
    print(f"wrote {run / 'evaluation.json'} and report.html", file=sys.stderr)
    return 0


def report_command(argv):
    """(Re)write RUN/report.html from whatever the run folder holds, for runs of any age."""
    run = Path(subcommand("report", "Write a run folder's report.html: curves, pictures, figures.").parse_args(argv).run)
    if not (run / "metrics.jsonl").is_file() and not (run / "config.json").is_file():
        raise UserError(f"{run}: not a run folder (no metrics.jsonl or config.json)")
    write_report(run)
    print(f"wrote {run / 'report.html'}", file=sys.stderr)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"encode": encode, "decode": decode_command, "sample": sample, "evaluate": evaluate_command,
                "report": report_command, "export": export.export_command,
                "import": export.import_command}
    try:
        if os.environ.get("VQVAE_DEVICE", "auto").strip().lower() not in DEVICES:
            raise UserError(f"VQVAE_DEVICE must be one of {', '.join(DEVICES)}, got {os.environ['VQVAE_DEVICE']!r}")
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return train(*configs_from_args(build_parser().parse_args(argv)))
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
