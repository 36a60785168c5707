"""Speech: what a run of the audio codec (audio.py) needs beside the codec, as datasets.py,
evaluation.py and report.py are for images.

    crops(waves, seed, step, B, T)      a training batch: B windows of T samples, a function of the step
    reconstruct_clips(model, waves)     held-out clips through the codec with the first n of its stages
    codec_figures(...)                  per number of stages: bits per second, SI-SNR, log-mel distance,
                                        the codes each stage uses
    AudioJudge                          evaluation.Judge on log-mel spectrograms, trained on the training
                                        clips to tell the digit (or the speaker)
    write_audio(run, ...)               WAVs of held-out clips and of their reconstructions at each
                                        bitrate; spectrograms.png, originals over reconstructions
    encode_clips(args), decode_clips    `train.py encode` and `decode` of a speech run: clips -> codes
                                        (.npz) -> WAV files
"""
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

import audio
import evaluation
import prior as P
import vqvae
from datasets import batch_indices, load_dataset, write_wav
from evaluation import Judge, JudgeConfig
from report import image_grid, write_png
from runs import READ_ERRORS, UserError, check_output, checkpoint_note, load_model, save_npz, unreadable


# -----------------------------------------------------------------------------
# batches and held-out reconstructions


def checked_config(cfg, codec_cfg, data, resuming):
    """The codec's settings checked against the data and the run's -> the codec's config, which
    with speaker_conditioning names the data's speakers (the run's own, when resuming)."""
    if codec_cfg.sample_rate != data["sample_rate"]:
        raise UserError(f"{cfg.data} is sampled at {data['sample_rate']} Hz, the codec at {codec_cfg.sample_rate} Hz")
    if cfg.crop_samples % codec_cfg.hop or cfg.crop_samples < max(codec_cfg.spectral_windows):
        raise UserError(f"--crop-samples {cfg.crop_samples} must be a multiple of the codec's {codec_cfg.hop} samples "
                        f"a frame and at least its longest spectral window, {max(codec_cfg.spectral_windows)}")
    for name in ("batch_size", "prior_batch_size"):
        if getattr(cfg, name) > len(data["train"]):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is larger than the {len(data['train'])} "
                            f"training clips")
    if cfg.prior_stages > codec_cfg.stages:
        raise UserError(f"--prior-stages {cfg.prior_stages}: the codec has {codec_cfg.stages}")
    speakers = tuple(data["speakers"]) if codec_cfg.speaker_conditioning else ()
    if resuming and codec_cfg.speakers != speakers:
        raise UserError(f"the run's codec was trained with the speakers {', '.join(codec_cfg.speakers) or 'none'}; "
                        f"{cfg.data} has {', '.join(speakers) or 'none'}")
    return replace(codec_cfg, speakers=speakers)


def crops(waves, seed, step, batch_size, length):
    """The training batch of a step: batch_size clips (each epoch a shuffle, as for images), from
    each a window of `length` samples at a random place; a shorter clip lies at a random place in
    silence -> ((B, length) float32 on the model's scale (samples / audio.WAVE_STD), the clips' indices)."""
    idx = batch_indices(seed, step, len(waves), batch_size)
    rng = vqvae.step_rng((seed, 3), step)
    x = np.zeros((len(idx), length), np.float32)
    for row, i in enumerate(idx):
        w = waves[i]
        if len(w) >= length:
            start = rng.integers(0, len(w) - length + 1)
            x[row] = w[start:start + length]
        else:
            start = rng.integers(0, length - len(w) + 1)
            x[row, start:start + len(w)] = w
    return x / audio.WAVE_STD, idx


def padded_batches(waves, multiple, batch_size):
    """The clips in batches of equal length once zero-padded up to a multiple of the codec's hop
    -> (indices, (B, T) float32 on the model's scale) pairs. Only clips of one padded length share
    a batch, so that a clip's codes and reconstruction are a function of the clip alone (the
    padding of a longer neighbour would reach into it through the convolutions)."""
    padded = [len(w) + -len(w) % multiple for w in waves]
    for T in sorted(set(padded)):
        same = [j for j, t in enumerate(padded) if t == T]
        for i in range(0, len(same), batch_size):
            idx = same[i:i + batch_size]
            x = np.zeros((len(idx), T), np.float32)
            for row, j in enumerate(idx):
                x[row, :len(waves[j])] = waves[j]
            yield idx, x / audio.WAVE_STD


def reconstruct_clips(model, waves, stages, speakers=None, batch_size=16):
    """Each clip encoded once with all its stages, then decoded from the first n of them for each n
    in `stages` (in the voice of its speaker in `speakers`, where the decoder takes one)
    -> ({n: [reconstructed clips, in [-1, 1] scale]}, [each clip's codes (S, frames)])."""
    out, codes = {n: [None] * len(waves) for n in stages}, [None] * len(waves)
    for idx, x in padded_batches(waves, model.cfg.hop, batch_size):
        c = vqvae.to_numpy(model.encode(x))                            # (B, S, T / M)
        for n in stages:
            y = vqvae.to_numpy(model.decode(c[:, :n], None if speakers is None else speakers[idx])) * audio.WAVE_STD
            for row, j in enumerate(idx):
                out[n][j] = y[row, :len(waves[j])]
        for row, j in enumerate(idx):
            codes[j] = c[row, :, :math.ceil(len(waves[j]) / model.cfg.hop)]  # the frames the clip covers
    return out, codes


def at_least(T, *waves):
    """Clips of one length as rows (N, max(T, length)), silence after them (a clip shorter than
    the log-mel distance's window)."""
    x = np.zeros((len(waves), max(T, len(waves[0]))), np.float32)
    for row, w in zip(x, waves):
        row[:len(w)] = w
    return x


def codec_figures(cfg, waves, recons, codes):
    """Per number of stages n: the bitrate, and the held-out clips' mean SI-SNR and log-mel distance
    to the originals (audio.py's measures), and the share of each stage's K codes in use over them."""
    counts = np.zeros((cfg.stages, cfg.codebook_size), np.int64)
    for c in codes:
        for s in range(cfg.stages):
            counts[s] += np.bincount(c[s], minlength=cfg.codebook_size)
    rows = []
    for n, rec in recons.items():
        si = [float(audio.si_snr(r[None], w[None])[0]) for r, w in zip(rec, waves)]
        lm = [float(audio.log_mel_distance(*at_least(256, r, w)[:, None])[0]) for r, w in zip(rec, waves)]
        rows.append({"stages": n, "bits_per_s": cfg.bitrate(n), "si_snr_db": float(np.mean(si)),
                     "log_mel_distance": float(np.mean(lm))})
    return rows, [float((c > 0).mean()) for c in counts]


# -----------------------------------------------------------------------------
# a judge of spoken digits: evaluation.Judge, its images log-mel spectrograms


JUDGE_SAMPLES = 12288  # the first 1.5 s of a clip (every clip of the five speakers is shorter), silence after it
MEL = dict(w=512, hop=128, n_mels=40)  # 64 ms windows every 16 ms, 40 mel bands: (N, 93, 40) for 1.5 s
TOP_DB = 60.0        # the judge hears what lies within 60 dB of a clip's loudest band, as log_mel_distance
NOISE_SNR = (10.0, 40.0)  # while it learns: half the clips with white noise at an SNR (dB) drawn from here ...
GAIN_DB = 6.0        # ... and every clip louder or quieter by up to this


def judge_images(waves, rate, offsets=None):
    """Clips -> log-mel spectrograms as one-channel images (N, frames, mels, 1): each clip placed at
    its offset (default 0) in JUDGE_SAMPLES of silence, cut there if longer, floored TOP_DB below
    its loudest band."""
    x = np.zeros((len(waves), JUDGE_SAMPLES), np.float32)
    for i, w in enumerate(waves):
        o = 0 if offsets is None else int(offsets[i])
        w = w[:JUDGE_SAMPLES - o]
        x[i, o:o + len(w)] = w
    return audio.log_mel(x, rate=rate, top_db=TOP_DB, **MEL)[..., None]


def perturbed(w, rng):
    """A training clip as the judge learns it: louder or quieter by up to GAIN_DB, and half the
    time with white noise at an SNR drawn from NOISE_SNR (of the clip's mean power), so that it
    learns the word and not the recording's exact noise floor."""
    w = w * np.float32(10 ** (rng.uniform(-GAIN_DB, GAIN_DB) / 20))
    if rng.random() < 0.5:
        sigma = np.sqrt(np.mean(w.astype(np.float64) ** 2) / 10 ** (rng.uniform(*NOISE_SNR) / 10))
        w = w + (sigma * rng.standard_normal(len(w))).astype(np.float32)
    return w


def with_frequency(images):
    """A second channel that holds each mel band's place, -1 (lowest) to 1 (highest): the judge
    averages its features over all positions, and without it could not tell a formant at 500 Hz
    from one at 2 kHz (CoordConv, Liu et al. 2018)."""
    N, F, M, _ = images.shape
    ramp = np.broadcast_to(np.linspace(-1, 1, M, dtype=np.float32)[None, None, :, None], (N, F, M, 1))
    return np.concatenate([images, ramp], 3)                           # (N, F, M, 2)


class AudioJudge:
    """A judge of clips: log-mel spectrograms, standardised by the training clips' mean and standard
    deviation (two numbers), into evaluation.Judge, a classifier of images."""

    def __init__(self, judge, mean, std, rate):
        self.judge, self.mean, self.std, self.rate = judge, mean, std, rate

    def embed(self, waves, batch_size=250):
        """Clips -> (features (N, 4w) in float64, as FID's pool features; the predicted class (N,))."""
        feats, preds = [], []
        for i in range(0, len(waves), batch_size):
            x = with_frequency((judge_images(waves[i:i + batch_size], self.rate) - self.mean) / self.std)
            f = self.judge.features.forward(self.judge.xp.asarray(x, dtype=self.judge.cfg.dtype))
            preds.append(vqvae.to_numpy(self.judge.head.forward(f)[:, 0, 0].argmax(1)))
            feats.append(vqvae.to_numpy(f[:, 0, 0]).astype(np.float64))
        return np.concatenate(feats), np.concatenate(preds)

    def predict(self, waves):
        return self.embed(waves)[1]


def train_audio_judge(waves, labels, K, rate, seed, steps, device, batch_size=32, lr=4e-3, warmup=50, log=None):
    """An AudioJudge trained on the training clips to tell their labels (K classes), each batch's
    clips placed at random offsets in the 1.5 s window so that it learns the word, not its place,
    and perturbed (gain, noise) so that it learns the word, not the recording.

    Its learning rate rises to `lr` over `warmup` steps, then falls linearly to nearly zero at the
    last step, so that the judge ends where its loss has settled rather than wherever its last
    batch threw it. A judge still learning is not only noisier but can be biased: training it
    longer taught it more of the reconstructions than of the conversions, so the ratio of the two
    read high while it was still learning (docs/audio.md, How long the judges learn)."""
    ref = judge_images(waves[:256], rate)
    mean, std = float(ref.mean()), float(ref.std())
    judge = Judge(JudgeConfig(in_channels=2, num_classes=K, seed=seed), device)
    opt = vqvae.Adam(judge.params, lr=lr)
    batch_size, warmup = min(batch_size, len(waves)), min(warmup, steps // 2)
    for s in range(steps):
        opt.lr = vqvae.lr_at(s, lr, warmup, steps, 0.0)
        idx = batch_indices(seed, s, len(waves), batch_size)
        rng = np.random.default_rng([seed, s])
        offsets = [rng.integers(0, max(1, JUDGE_SAMPLES - len(waves[i]) + 1)) for i in idx]
        clips = [perturbed(waves[i], rng) for i in idx]
        x = with_frequency((judge_images(clips, rate, offsets) - mean) / std)
        stats = judge.train_step(x, labels[idx], opt)
        if log and (s + 1) % 250 == 0:
            log(f"judge {s + 1}/{steps} loss {float(stats['loss']):.4g} accuracy {float(stats['accuracy']):.3f}")
    return AudioJudge(judge, mean, std, rate)


def audio_judge_for(run, data, task, seed, steps, device):
    """The run's judge of `task` (digit or speaker): RUN/judge_<task>_seed<seed>.npz, or trained and saved
    there (anew where the saved one had other steps, or the constant learning rate of earlier judges)."""
    path = run / f"judge_{task}_seed{seed}.npz"
    labels = data["train_labels"] if task == "digit" else data["train_speakers"]
    K = data["num_classes"] if task == "digit" else len(data["speakers"])
    saved = (checkpoint_note(path, "steps"), checkpoint_note(path, "schedule")) if path.is_file() else None
    if saved == (str(steps), "decayed"):
        judge = load_model(path, Judge, device)
        if judge.cfg.num_classes == K:
            return AudioJudge(judge, float(checkpoint_note(path, "mean")), float(checkpoint_note(path, "std")),
                              data["sample_rate"])
    print(f"training a judge of the {task} on the {len(labels)} training clips ({steps} steps)", file=sys.stderr)
    t = time.time()
    j = train_audio_judge(data["train"], labels, K, data["sample_rate"], seed, steps, device,
                          log=lambda text: print(text, file=sys.stderr))
    save_npz(path, {**j.judge.state_dict(), "config": np.array(json.dumps(asdict(j.judge.cfg))),
                    "steps": np.array(str(steps)), "schedule": np.array("decayed"),
                    "mean": np.array(str(j.mean)), "std": np.array(str(j.std)),
                    "train_time_s": np.array(time.time() - t)})
    return j


def judge_figures(judges, data, recons):
    """Each judge's accuracy on the held-out real clips and on their reconstructions from n stages."""
    fig = {}
    for task, judge in judges.items():
        truth = data["test_labels"] if task == "digit" else data["test_speakers"]
        fig[f"accuracy_{task}_real"] = float((judge.predict(data["test"]) == truth).mean())
        for n, rec in recons.items():
            fig[f"accuracy_{task}_stages{n}"] = float((judge.predict(rec) == truth).mean())
    return fig


# -----------------------------------------------------------------------------
# what the run leaves to listen to and look at


# a perceptually ordered ramp (black, purple, red, orange, pale yellow) for spectrograms
RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)


def colour(v):
    """Values in [0, 1] -> uint8 RGB along RAMP."""
    pos = np.clip(v, 0, 1) * (len(RAMP) - 1)
    i = np.minimum(pos.astype(int), len(RAMP) - 2)
    t = (pos - i)[..., None]
    return np.round(RAMP[i] * (1 - t) + RAMP[i + 1] * t).astype(np.uint8)


def spectrogram_image(w, rate, floor_db=-80.0, length=None):
    """A clip's log-magnitude spectrogram (256-sample windows, hop 64) as an RGB image, low
    frequencies at the bottom, 0 dB the loudest bin of the clip down to floor_db; `length` pads
    the clip with silence so that images of clips of different lengths line up."""
    x = np.zeros(max(length or 0, len(w), 256), np.float32)
    x[:len(w)] = w
    P = audio.stft_power(x[None], 256, 64)[0][0]                       # (frames, 129)
    db = 10 * np.log10(np.maximum(P, 1e-10))
    return colour((db - db.max() - floor_db) / -floor_db).transpose(1, 0, 2)[::-1]  # (129, frames, 3)


def write_audio(run, data, recons, n_clips=8):
    """RUN/audio/: n_clips held-out clips (one digit each, the speakers in turn) as WAVs, each with
    its reconstructions from every number of stages; RUN/spectrograms.png: their spectrograms,
    the originals over the reconstructions from all stages, then from a quarter of them."""
    rate, names = data["sample_rate"], data["names_test"]
    labels, speakers = data["test_labels"], data["test_speakers"]
    picks = []
    for d in range(n_clips):
        hits = np.flatnonzero((labels == d % data["num_classes"]) & (speakers == d % len(data["speakers"])))
        picks.append(int(hits[0]) if len(hits) else d % len(names))
    folder = run / "audio"
    folder.mkdir(exist_ok=True)
    stages = sorted(recons)
    for i in picks:
        stem = names[i].removesuffix(".wav")
        write_wav(folder / f"{stem}_original.wav", data["test"][i], rate)
        for n in stages:
            write_wav(folder / f"{stem}_stages{n}.wav", recons[n][i], rate)
    length = max(len(data["test"][i]) for i in picks)
    rows = [data["test"], recons[stages[-1]]] + ([recons[max(1, stages[-1] // 4)]] if stages[-1] >= 4 else [])
    grid = [np.stack([spectrogram_image(row[i], rate, length=length) for i in picks]) for row in rows]
    write_png(run / "spectrograms.png", image_grid(grid, scale=1))
    return picks


def measure_codec(run, model, data, judge_steps, device):
    """The codec on every held-out clip at each number of stages (each clip in its own voice where
    the decoder takes one): codec_figures, write_audio; with judge_steps, the judges of the digit and
    the speaker (trained once, kept in the run folder) on real clips and reconstructions."""
    print(f"measuring the {len(data['test'])} held-out clips at each of {model.cfg.stages} numbers of stages",
          file=sys.stderr)
    t = time.time()
    recons, codes = reconstruct_clips(model, data["test"], range(1, model.cfg.stages + 1),
                                      data["test_speakers"] if model.cfg.speakers else None)
    summary = dict(zip(("per_stages", "codes_used_per_stage"), codec_figures(model.cfg, data["test"], recons, codes)))
    write_audio(run, data, recons)
    if judge_steps:
        judges = {task: audio_judge_for(run, data, task, 0, judge_steps, device) for task in ("digit", "speaker")}
        fig = judge_figures(judges, data, recons)
        for row in summary["per_stages"]:
            row.update({k.removesuffix(f"_stages{row['stages']}"): v for k, v in fig.items()
                        if k.endswith(f"_stages{row['stages']}")})
        summary.update({k: v for k, v in fig.items() if k.endswith("_real")})
    return {**summary, "evaluate_time_s": time.time() - t}


def codec_table(summary):
    """summary.json's figures per number of stages as a small table."""
    judged = [k for k in ("accuracy_digit", "accuracy_speaker") if k in summary["per_stages"][0]]
    lines = [f"{'stages':>6} {'bits/s':>7} {'SI-SNR dB':>9} {'log-mel':>8}" + "".join(f" {k[9:] + ' acc':>12}" for k in judged)]
    for row in summary["per_stages"]:
        lines.append(f"{row['stages']:>6} {row['bits_per_s']:>7.0f} {row['si_snr_db']:>9.2f} {row['log_mel_distance']:>8.3f}"
                     + "".join(f" {row[k]:>12.3f}" for k in judged))
    if judged:
        lines.append("real held-out clips: " + ", ".join(f"{k[9:]} acc {summary[k + '_real']:.3f}" for k in judged))
    lines.append("codes used per stage: " + " ".join(f"{u:.2f}" for u in summary["codes_used_per_stage"]))
    if "prior_val_bits_per_code" in summary:
        lines.append(f"prior: {summary['prior_val_bits_per_code']:.3f} bits per code on the held-out clips")
    if "accuracy_digit_samples" in summary:
        lines.append(f"spoken from the prior: digit acc {summary['accuracy_digit_samples']:.3f} (its reconstructions "
                     f"{summary['accuracy_digit_recon']:.3f}); Frechet distance to reconstructions "
                     f"{summary['fd_samples_recon']:.2f} (floor {summary['fd_recon_halves']:.2f})")
    if "conversion_speaker_target" in summary:
        lines.append(f"converted to another voice: the target speaker heard in {summary['conversion_speaker_target']:.3f}"
                     f" (the source in {summary['conversion_speaker_source']:.3f}), the digit in "
                     f"{summary['conversion_digit']:.3f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# stage 2: a prior over the codes, digits spoken from it; one clip's codes in another voice


def measure_prior(run, model, prior, data, cfg, rule):
    """Stage 2's files and figures: as many digits spoken from the prior as there are held-out clips
    (RUN/samples/, samples.png), the held-out clips converted to other voices (RUN/converted/, ten of
    them), and with cfg.evaluate the judges' figures on both (prior_figures)."""
    t, n, stages = time.time(), len(data["test"]), cfg.prior_stages
    print(f"speaking {n} digits from the prior, and converting {n} held-out clips into each other voice",
          file=sys.stderr)
    samples, digits, _ = sample_clips(model, prior, n, cfg.prior_frames, stages, cfg.seed + 1, rule)
    fig = {"samples": n, "sample_time_s": time.time() - t}
    write_samples(run, samples, digits, data["sample_rate"])
    converted = sources = targets = None
    if model.cfg.speakers:
        converted, sources, targets = converted_clips(model, data["test"], data["test_speakers"], stages)
        (run / "converted").mkdir(exist_ok=True)
        for i in range(0, len(converted), max(1, len(converted) // 10))[:10]:
            write_wav(run / "converted" / f"{data['names_test'][sources[i]].removesuffix('.wav')}_as_"
                      f"{model.cfg.speakers[targets[i]]}.wav", converted[i], data["sample_rate"])
    if cfg.evaluate:
        judges = {task: audio_judge_for(run, data, task, 0, cfg.judge_steps, cfg.device) for task in ("digit", "speaker")}
        recons = reconstruct_clips(model, data["test"], [stages], data["test_speakers"] if model.cfg.speakers else None)
        fig.update(prior_figures(judges, data, recons[0][stages], samples, digits, converted, sources, targets))
    fig["prior_evaluate_time_s"] = time.time() - t
    return fig


def prior_grids(model, waves, stages, frames, batch_size=64):
    """Clips -> the code grids a prior models (N, frames, stages): each clip cut, or padded with
    silence, to `frames` frames, encoded, and its first `stages` stages kept. A row is a frame,
    its stages coarse to fine along the row: in the prior's raster order a frame's first stage is
    predicted from the frames before it, each later stage from those and the stages before it in
    its frame (a stage codes what the earlier ones left, and means nothing without them)."""
    T, grids = frames * model.cfg.hop, []
    for i in range(0, len(waves), batch_size):
        x = np.zeros((len(waves[i:i + batch_size]), T), np.float32)
        for row, w in zip(x, waves[i:i + batch_size]):
            row[:min(T, len(w))] = w[:T]
        grids.append(vqvae.to_numpy(model.encode(x / audio.WAVE_STD, stages)).transpose(0, 2, 1))
    return np.concatenate(grids).astype(np.int64)


def speaker_grids(speakers, frames, stages):
    """Speakers (N,) -> grids (N, frames, stages) of each one's index: how a prior is told the voice
    that its codes will be decoded in. The speaker is a conditioning code in every cell (prior.py's
    cond_codes, the path VQ-VAE-2's bottom prior takes the top codes by), so that each gated layer
    adds an embedding of it, as WaveNet's global conditioning adds the speaker's."""
    return np.tile(np.asarray(speakers, np.int64)[:, None, None], (1, frames, stages))


def decode_grids(model, grids, speakers=None, batch_size=64):
    """Code grids (N, frames, stages) -> clips (N, frames * hop) in [-1, 1] scale, in the voices
    of `speakers` (N,) where the decoder takes one."""
    out = []
    for i in range(0, len(grids), batch_size):
        who = None if speakers is None else speakers[i:i + batch_size]
        out.append(vqvae.to_numpy(model.decode(grids[i:i + batch_size].transpose(0, 2, 1), who)) * audio.WAVE_STD)
    return np.concatenate(out)


def sample_clips(model, prior, n, frames, stages, seed, rule):
    """n clips spoken from the prior -> (clips (n, frames * hop), digits, speakers): clip i asked
    for the digit i mod 10 (an unconditional prior: none asked) and decoded in the voice of
    speaker (i // 10) mod S where the decoder takes one, so that ten clips hold every digit once; a
    prior told the speaker (config.prior_configs) is told that one."""
    digits = np.arange(n) % 10
    S = len(model.cfg.speakers)
    speakers = (np.arange(n) // 10) % S if S else None
    voices = speaker_grids(speakers, frames, stages) if prior.cfg.cond_codebook_size else None
    grids = vqvae.to_numpy(P.sample(prior, n, frames, stages, seed, labels=digits if prior.cfg.num_classes else None,
                                    cond_codes=voices, **rule))
    return decode_grids(model, grids, speakers), digits, speakers


def converted_clips(model, waves, speakers, stages):
    """Each clip's codes from the first `stages` stages decoded in the voice of every other speaker
    (S - 1 conversions a clip, for the judges S - 1 times as many as one each) -> (clips, the index
    in `waves` of each one's source, its target speaker): the k-th block of len(waves) holds every
    clip in the voice of speaker (own + k) mod S."""
    S, n = len(model.cfg.speakers), len(waves)
    sources = np.tile(np.arange(n), S - 1)
    targets = (speakers[sources] + np.repeat(np.arange(1, S), n)) % S
    clips = reconstruct_clips(model, [waves[i] for i in sources], [stages], speakers=targets)[0][stages]
    return clips, sources, targets


def prior_figures(judges, data, recons, samples, digits, converted, sources, targets):
    """The judges on the spoken digits: the digit judge's accuracy on samples (the digit asked
    for) and on the reconstructions `recons` of the held-out clips; the Frechet distance in its
    features from samples to reconstructions and its floor, two halves of the reconstructions
    (each distance n/2 against n/2, as for images); for the clips converted from `sources`, how
    often the speaker judge hears the target speaker (or the source's) and the digit judge the digit."""
    (f_real, _), (f_rec, p_rec) = judges["digit"].embed(data["test"]), judges["digit"].embed(recons)
    f_smp, p_smp = judges["digit"].embed(list(samples))
    h = min(len(f_rec), len(f_smp)) // 2
    A, B = slice(0, h), slice(h, 2 * h)
    fig = {"accuracy_digit_samples": float((p_smp == digits).mean()),
           "accuracy_digit_recon": float((p_rec == data["test_labels"]).mean()),
           "fd_recon_halves": evaluation.frechet_distance(f_rec[A], f_rec[B]),  # the floor of fd_samples_recon
           "fd_samples_recon": evaluation.frechet_distance(f_smp[A], f_rec[B]),
           "fd_real_halves": evaluation.frechet_distance(f_real[A], f_real[B]),
           "fd_samples_real": evaluation.frechet_distance(f_smp[A], f_real[B])}
    if converted is not None:
        heard = judges["speaker"].predict(converted)
        fig["conversion_speaker_target"] = float((heard == targets).mean())
        fig["conversion_speaker_source"] = float((heard == data["test_speakers"][sources]).mean())
        fig["conversion_digit"] = float((judges["digit"].predict(converted) == data["test_labels"][sources]).mean())
    return fig


def write_samples(run, samples, digits, rate, per_digit=10):
    """RUN/samples/: per_digit WAVs of each digit spoken from the prior; RUN/samples.png: their
    spectrograms, a row per digit (five of each)."""
    folder = run / "samples"
    folder.mkdir(exist_ok=True)
    rows = [[] for _ in range(10)]
    for i, (w, d) in enumerate(zip(samples, digits)):
        k = i // 10
        if k < per_digit:
            write_wav(folder / f"digit{d}_{k}.wav", w, rate)
        if k < 5:
            rows[d].append(spectrogram_image(w, rate))
    write_png(run / "samples.png", image_grid([np.stack(r) for r in rows if r], scale=1))


# -----------------------------------------------------------------------------
# the codes of clips: `train.py encode` and `decode`


def encode_clips(args):
    """`train.py encode` of a speech run: every clip of the split -> its codes from all stages, in one
    .npz: 'codes' (N, S, frames), padded with -1 after each clip's 'frames', and 'names'."""
    model = load_model(Path(args.run) / "checkpoint.npz", audio.Codec, args.device)
    check_output(args.out, "--out", ".npz", args.force)                # before the data is read
    data = load_dataset(args.data, args.data_dir)
    if data.get("sample_rate") != model.cfg.sample_rate:
        raise UserError(f"{args.data} is not speech at the codec's {model.cfg.sample_rate} Hz")
    _, codes = reconstruct_clips(model, data[args.split], [])
    frames = np.array([c.shape[1] for c in codes])
    padded = np.full((len(codes), model.cfg.stages, frames.max()), -1, np.int16)
    for i, c in enumerate(codes):
        padded[i, :, :c.shape[1]] = c
    save_npz(args.out, {"codes": padded, "frames": frames, "names": np.array(data[f"names_{args.split}"])})
    print(f"wrote {args.out}: codes {padded.shape} in [0, {model.cfg.codebook_size}) of {len(codes)} clips",
          file=sys.stderr)
    return 0


def voices_of(model, names, speaker, source):
    """The speaker each clip is decoded as, (1,) arrays of indices into the codec's speakers: `speaker`
    (a name) for all, or each clip's own, from its name (digit_speaker_index); Nones for a codec
    whose decoder takes no speaker."""
    known = model.cfg.speakers
    if not known:
        if speaker:
            raise UserError(f"--speaker {speaker}: this codec's decoder takes no speaker (trained without "
                            f"--codec-speaker-conditioning)")
        return [None] * len(names)
    wanted = [speaker] * len(names) if speaker else [Path(n).stem.split("_")[1] if n.count("_") == 2 else None
                                                     for n in names]
    for name, who in zip(names, wanted):
        if who not in known:
            raise UserError((f"--speaker {speaker}" if speaker else f"{source}: clip {name}: speaker {who}") +
                            f" is not one the codec knows ({', '.join(known)})" +
                            ("" if speaker else "; give --speaker NAME"))
    return [np.array([known.index(who)]) for who in wanted]


def decode_clips(args):
    """`train.py decode`: the codes of an .npz from `encode_clips` (or a prior) -> a WAV file per clip."""
    out = Path(args.out)
    model = load_model(Path(args.run) / "checkpoint.npz", audio.Codec, args.device)
    if args.stages > model.cfg.stages:
        raise UserError(f"--stages {args.stages}: the codec has {model.cfg.stages}")
    try:
        with np.load(args.codes, allow_pickle=False) as f:
            codes, frames, names = f["codes"], f["frames"], [str(n) for n in f["names"]]
    except READ_ERRORS as e:
        raise unreadable(args.codes, "not codes written by train.py encode (arrays codes, frames, names)", e)
    if codes.ndim != 3 or len(frames) != len(codes) or len(names) != len(codes) or frames.max() > codes.shape[2]:
        raise UserError(f"{args.codes}: codes {codes.shape}, frames {frames.shape} and names of {len(names)} "
                        f"clips do not fit together")
    voices = voices_of(model, names, args.speaker, args.codes)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / (Path(n).stem + ".wav") for n in names]
    if not args.force and (taken := [p for p in paths if p.exists()]):
        raise UserError(f"--out {out}: {taken[0].name} exists; give --force to write over it, or another folder")
    n = args.stages or codes.shape[1]
    for path, c, f, who in zip(paths, codes, frames, voices):
        try:
            wave = vqvae.to_numpy(model.decode(c[None, :n, :f], who))[0] * audio.WAVE_STD
        except ValueError as e:
            raise UserError(f"{args.codes}: {path.stem}: {e}")
        write_wav(path, wave, model.cfg.sample_rate)
    print(f"wrote {len(paths)} WAV files to {out}, decoded from {n} stages", file=sys.stderr)
    return 0
