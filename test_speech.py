"""speech.py and train.py's run of the audio codec: batches, held-out reconstructions and their
figures, the judge of spoken digits, what a run leaves, and the command line, on small WAV
folders written here (never the real recordings)."""
import json

import numpy as np
import pytest

import audio as A
import config
import datasets as D
import prior as P
import speech as S
import train as T
import vqvae as V
from conftest import one_error_line, read_png

RATE = 8000
TINY_CODEC = ["--codec-channels", "2", "--codec-strides", "2,2", "--codec-code-dim", "3", "--codec-stages", "3",
              "--codec-codebook-size", "8", "--codec-spectral-windows", "16,32", "--crop-samples", "64",
              "--batch-size", "4", "--judge-steps", "2", "--prior-steps", "2", "--prior-channels", "4",
              "--prior-layers", "2", "--prior-batch-size", "4", "--prior-frames", "8"]


def tone(freq, n, seed):
    """A tone of n samples at freq Hz with a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6)) + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture
def fsdd_dir(tmp_path):
    """A folder of {digit}_{speaker}_{index}.wav: digits 0-2 as tones of 300, 900 and 2000 Hz, two
    speakers, indices 0-6 (0-4 held out), 300 to 900 samples each."""
    folder = tmp_path / "fsdd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for digit, freq in enumerate((300, 900, 2000)):
        for speaker in ("ann", "bob"):
            for index in range(7):
                D.write_wav(folder / f"{digit}_{speaker}_{index}.wav", tone(freq, int(rng.integers(300, 900)), index), RATE)
    return folder


def tiny_codec(**kw):
    base = dict(channels=2, strides=(2, 2), code_dim=3, stages=3, codebook_size=8, spectral_windows=(16, 32))
    return A.Codec(A.CodecConfig(**{**base, **kw}))


def speech_run(tmp_path, fsdd_dir, name="run", steps=4, extra=()):
    run = tmp_path / name
    assert T.main(["--data", "fsdd", "--data-dir", str(fsdd_dir), "--out", str(run), "--steps", str(steps),
                   "--eval-every", "2", *TINY_CODEC, *extra]) == 0
    return run


# -----------------------------------------------------------------------------
# batches and held-out reconstructions


def test_crops_are_windows_of_their_clips_and_a_function_of_the_step():
    waves = [tone(300, n, i) for i, n in enumerate((50, 200, 64, 500))]
    x, idx = S.crops(waves, 3, 7, 4, 64)
    assert x.shape == (4, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x, S.crops(waves, 3, 7, 4, 64)[0])   # the step's batch, recomputed
    assert not np.array_equal(x, S.crops(waves, 3, 8, 4, 64)[0])
    np.testing.assert_array_equal(idx, D.batch_indices(3, 7, len(waves), 4))  # the clips the rows come from
    for row, i in zip(x * A.WAVE_STD, idx):
        w = waves[i]
        if len(w) >= 64:                                               # a window of the clip
            assert any(np.allclose(row, w[o:o + 64]) for o in range(len(w) - 63))
        else:                                                          # the clip, in silence
            start = int(np.flatnonzero(row)[0])
            np.testing.assert_allclose(row[start:start + len(w)], w)
            assert np.count_nonzero(row) == np.count_nonzero(w)


def test_padded_batches_hold_every_clip_once_zero_padded_to_the_hop():
    waves = [tone(300, n, i) for i, n in enumerate((10, 70, 33, 64, 5))]
    seen = []
    for idx, x in S.padded_batches(waves, 8, 2):
        assert x.shape[1] % 8 == 0 and x.shape[1] >= max(len(waves[j]) for j in idx)
        for row, j in zip(x * A.WAVE_STD, idx):
            np.testing.assert_allclose(row[:len(waves[j])], waves[j], rtol=1e-6)
            assert not row[len(waves[j]):].any()
        seen += list(idx)
    assert sorted(seen) == list(range(len(waves)))


def test_reconstructions_keep_each_clips_length_and_codes_cover_its_frames():
    model = tiny_codec()
    waves = [tone(300, n, i) for i, n in enumerate((9, 40, 17))]
    recons, codes = S.reconstruct_clips(model, waves, [1, 3], batch_size=2)
    for n in (1, 3):
        assert [len(r) for r in recons[n]] == [9, 40, 17]
    assert [c.shape for c in codes] == [(3, 3), (3, 10), (3, 5)]       # ceil(T / 4) frames of 3 stages
    x = np.zeros((1, 12), np.float32)
    x[0, :9] = waves[0] / A.WAVE_STD                                   # the first clip alone, padded
    np.testing.assert_allclose(recons[3][0], (model.reconstruct(x)[0] * A.WAVE_STD)[:9], rtol=1e-5, atol=1e-6)


def test_codec_figures_give_the_bitrate_the_measures_and_the_codes_each_stage_uses():
    cfg = A.CodecConfig(stages=2, codebook_size=4, strides=(2, 2))
    waves = [tone(300, 300, 0), tone(900, 300, 1)]
    recons = {1: [w * 0.5 for w in waves], 2: waves}
    codes = [np.array([[0, 1, 1], [2, 2, 2]]), np.array([[1, 0, 0], [2, 2, 2]])]
    rows, used = S.codec_figures(cfg, waves, recons, codes)
    assert [r["bits_per_s"] for r in rows] == [8000 / 4 * 2, 8000 / 4 * 4]
    assert rows[1]["si_snr_db"] == 100 and rows[1]["log_mel_distance"] == 0   # a perfect copy
    assert rows[0]["si_snr_db"] == pytest.approx(100, abs=1)           # scale-invariant ...
    assert 0.9 * np.log(4) < rows[0]["log_mel_distance"] <= np.log(4) + 1e-6   # ... but not the log-mel distance:
    # a quarter of the power in every band, less in the few bands that fall under the original's floor
    assert used == [0.5, 0.25]


# -----------------------------------------------------------------------------
# the judge of spoken digits, and what a run leaves


def test_prior_grids_are_a_clips_first_stages_frame_by_frame_and_decode_back_to_its_codes():
    codec = tiny_codec(stages=3, speakers=("ann", "bob"))
    waves = [tone(300, n, i) for i, n in enumerate((10, 40, 100))]     # shorter, as long as, longer than 10 frames
    grids = S.prior_grids(codec, waves, 2, 10, batch_size=2)
    assert grids.shape == (3, 10, 2) and grids.dtype == np.int64       # (clips, frames, stages): a frame per row
    x = np.zeros((3, 40), np.float32)
    for row, w in zip(x, waves):
        row[:min(40, len(w))] = w[:40]                                 # silence after, or cut at, 10 frames of 4
    np.testing.assert_array_equal(grids, codec.encode(x / A.WAVE_STD, 2).transpose(0, 2, 1))
    who = np.array([1, 0, 1])
    np.testing.assert_allclose(S.decode_grids(codec, grids, who, batch_size=2),
                               codec.decode(grids.transpose(0, 2, 1), who) * A.WAVE_STD, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_the_fast_sampler_speaks_the_naive_samplers_codes_on_a_tall_grid_of_frames(stages, dilation):
    # the speech prior's grid: many frames (rows) of one or two stages (columns), class-conditional,
    # guided, with the attention layer that reaches the frames further back than the convolutions,
    # and the vertical stacks dilated (frames 1, 2, 4 apart) or not
    prior = P.PixelCNN(P.PriorConfig(codebook_size=8, num_classes=10, channels=8, layers=3, heads=2, attention_every=2,
                                     label_dropout=0.1, dtype="float64", seed=stages, dilation=dilation))
    for p in prior.params.values():                                   # sharper logits than at initialisation
        p *= 3
    digits = np.array([3, 7, 0])
    fast = P.sample(prior, 3, 12, stages, 5, labels=digits, guidance=1.5)
    np.testing.assert_array_equal(fast, P.sample_naive(prior, 3, 12, stages, 5, labels=digits, guidance=1.5))
    assert len(np.unique(fast)) > 1


def test_a_prior_told_the_speaker_hears_it_in_every_cell_and_speaks_the_voice_it_is_given():
    # config.prior_configs: a codec that takes the speaker gets a prior told it too (one conditioning
    # code a clip, embedded, no conditioning stack); a codec without speakers, a prior without
    codec = tiny_codec(speakers=("ann", "bob", "cat"))
    told, = config.prior_configs({"channels": 4, "layers": 2, "heads": 1}, codec.cfg, 10, 0)
    assert (told.cond_codebook_size, told.cond_channels, told.cond_blocks) == (3, config.PRIOR_SPEAKER_CHANNELS, 0)
    plain, = config.prior_configs({}, tiny_codec().cfg, 10, 0)
    assert plain.cond_codebook_size == plain.cond_channels == 0
    grids = S.speaker_grids(np.array([2, 0]), 5, 2)
    assert grids.shape == (2, 5, 2) and (grids[0] == 2).all() and (grids[1] == 0).all()
    prior = P.PixelCNN(told)
    for p in prior.params.values():                                   # sharper logits than at initialisation
        p *= 3
    rule = dict(temperature=1.0, top_k=0, top_p=1.0, guidance=1.5)
    clips, digits, speakers = S.sample_clips(codec, prior, 30, 6, 2, 0, rule)
    codes = P.sample(prior, 30, 6, 2, 0, labels=digits, cond_codes=S.speaker_grids(speakers, 6, 2), **rule)
    np.testing.assert_allclose(clips, S.decode_grids(codec, V.to_numpy(codes), speakers), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(codes, P.sample_naive(prior, 30, 6, 2, 0, labels=digits,
                                                        cond_codes=S.speaker_grids(speakers, 6, 2), **rule))
    others = P.sample(prior, 30, 6, 2, 0, labels=digits, cond_codes=S.speaker_grids((speakers + 1) % 3, 6, 2), **rule)
    assert not np.array_equal(codes, others)                           # the voice it is told changes what it says


def test_spoken_samples_ask_for_each_digit_in_turn_and_conversions_for_every_other_speaker():
    codec = tiny_codec(speakers=("ann", "bob", "cat"))
    prior = P.PixelCNN(P.PriorConfig(codebook_size=8, num_classes=10, channels=4, layers=2, heads=1))
    rule = dict(temperature=1.0, top_k=0, top_p=1.0, guidance=1.0)
    clips, digits, speakers = S.sample_clips(codec, prior, 25, 6, 2, 0, rule)
    assert clips.shape == (25, 6 * 4) and list(digits[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert list(speakers[8:12]) == [0, 0, 1, 1] and list(speakers[20:]) == [2] * 5
    np.testing.assert_array_equal(S.sample_clips(codec, prior, 25, 6, 2, 0, rule)[0], clips)  # a function of the seed
    waves = [tone(300, 64, i) for i in range(6)]
    own = np.array([0, 0, 1, 1, 2, 2])
    converted, sources, targets = S.converted_clips(codec, waves, own, 1)
    assert list(sources) == [0, 1, 2, 3, 4, 5] * 2
    assert list(targets) == [1, 1, 2, 2, 0, 0, 2, 2, 0, 0, 1, 1]       # every clip in each other voice once
    assert len(converted) == 12 and converted[0].shape == (64,)
    for i in (0, 7):                                                   # each its source's first-stage codes
        np.testing.assert_allclose(converted[i], S.reconstruct_clips(codec, [waves[sources[i]]], [1],
                                                                     targets[i:i + 1])[0][1][0], rtol=1e-6, atol=1e-7)


def test_a_judge_trained_on_tones_tells_them_apart_and_by_their_pitch(fsdd_dir):
    data = D.load_dataset("fsdd", fsdd_dir)
    judge = S.train_audio_judge(data["train"], data["train_labels"], 3, RATE, 0, 150, "cpu")
    assert (judge.predict(data["test"]) == data["test_labels"]).mean() >= 0.9
    assert S.judge_images(data["test"][:2], RATE).shape == (2, 93, 40, 1)


def test_a_run_keeps_its_judge_and_retrains_one_of_other_steps_or_the_old_constant_rate(tmp_path, fsdd_dir):
    data = D.load_dataset("fsdd", fsdd_dir)
    path = tmp_path / "judge_digit_seed0.npz"
    note = lambda key: str(np.load(path, allow_pickle=False)[key])
    first = S.audio_judge_for(tmp_path, data, "digit", 0, 6, "cpu")
    saved = dict(np.load(path, allow_pickle=False))
    again = S.audio_judge_for(tmp_path, data, "digit", 0, 6, "cpu")  # read back, not trained again
    assert (again.predict(data["test"]) == first.predict(data["test"])).all()
    assert note("train_time_s") == str(saved["train_time_s"])
    old = {k: v for k, v in saved.items() if k != "schedule"}        # a judge of the earlier, constant rate
    old["train_time_s"] = np.array(-1.0)
    np.savez(path, **old)
    S.audio_judge_for(tmp_path, data, "digit", 0, 6, "cpu")
    assert float(note("train_time_s")) >= 0 and note("schedule") == "decayed"
    S.audio_judge_for(tmp_path, data, "digit", 0, 7, "cpu")
    assert note("steps") == "7"


def test_spectrogram_images_put_low_frequencies_at_the_bottom():
    low, high = S.spectrogram_image(tone(300, 2000, 0), RATE), S.spectrogram_image(tone(3500, 2000, 0), RATE)
    assert low.shape == high.shape == (129, 28, 3) and low.dtype == np.uint8
    brightest = lambda img: int(np.argmax(img.astype(int).sum((1, 2))))   # the row of most energy
    for img, freq in ((low, 300), (high, 3500)):                       # bin f w / rate, counted up from the bottom row
        assert abs(brightest(img) - (128 - freq * 256 / RATE)) <= 1, freq
    assert S.spectrogram_image(tone(300, 100, 0), RATE, length=2000).shape == low.shape  # padded to line up


def test_a_speech_run_leaves_figures_per_stage_wavs_spectrograms_and_a_report(tmp_path, fsdd_dir):
    run = speech_run(tmp_path, fsdd_dir)
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["per_stages"]
    assert [r["stages"] for r in rows] == [1, 2, 3]
    assert [r["bits_per_s"] for r in rows] == [RATE / 4 * 3 * n for n in (1, 2, 3)]
    for key in ("si_snr_db", "log_mel_distance", "accuracy_digit", "accuracy_speaker"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert len(summary["codes_used_per_stage"]) == 3 and 0 < summary["accuracy_digit_real"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["codec"]["channels"] == 2 and config["train"]["data"] == "fsdd" and "model" not in config
    wavs = sorted(p.name for p in (run / "audio").iterdir())
    assert "0_ann_0_original.wav" in wavs and "0_ann_0_stages3.wav" in wavs and len(wavs) == 8 * 4
    assert D.read_wav(run / "audio" / "0_ann_0_stages1.wav").shape == D.read_wav(fsdd_dir / "0_ann_0.wav").shape
    assert read_png(run / "spectrograms.png").shape[2] == 3
    page = (run / "report.html").read_text()
    assert "<audio" in page and "spectrograms.png" in page and "held-out SI-SNR" in page
    stages = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in stages} == {"codec", "prior"} and any("val_si_snr_db" in r for r in stages)
    # stage 2: the prior over the first stage's codes, digits spoken from it, clips in other voices
    assert config["codec"]["speakers"] == ["ann", "bob"] and config["priors"][0]["num_classes"] == 10
    assert config["priors"][0]["cond_codebook_size"] == 2                # told the speaker of each clip
    for key in ("prior_val_bits_per_code", "accuracy_digit_samples", "accuracy_digit_recon", "fd_samples_recon",
                "fd_recon_halves", "conversion_speaker_target", "conversion_speaker_source", "conversion_digit"):
        assert np.isfinite(summary[key]), key
    assert summary["samples"] == 30 and summary["wall_time_s"] > summary["vqvae_wall_time_s"]
    spoken = sorted(p.name for p in (run / "samples").iterdir())
    assert len(spoken) == 30 and "digit0_0.wav" in spoken and "digit9_2.wav" in spoken
    assert len(D.read_wav(run / "samples" / "digit0_0.wav")) == 8 * 4   # --prior-frames 8 frames of 4 samples
    converted = sorted(p.name for p in (run / "converted").iterdir())
    assert len(converted) == 10 and "0_ann_0_as_bob.wav" in converted
    assert read_png(run / "samples.png").shape[2] == 3
    assert "samples/digit0_0.wav" in page and "converted/0_ann_0_as_bob.wav" in page


def test_a_speech_run_resumes_where_it_stopped_and_refuses_a_changed_codec(tmp_path, fsdd_dir, capsys):
    run = speech_run(tmp_path, fsdd_dir, steps=2)
    assert T.main(["--resume", str(run), "--steps", "4"]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and json.loads((run / "summary.json").read_text())["steps"] == 4
    assert T.main(["--resume", str(run), "--steps", "6", "--codec-channels", "4"]) == 1
    assert "cannot change --codec-channels when resuming" in one_error_line(capsys)
    assert T.main(["--resume", str(run), "--stage", "prior", "--prior-steps", "3"]) == 0   # the prior trains on
    prior_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r["stage"] == "prior"]
    # a progress and a held-out record at step 2 of each of the first two runs (the codec trained on: the
    # prior anew), then the third run's from step 3 only: it continued the prior, not began it again
    assert prior_steps == [2, 2, 2, 2, 3, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


ADVERSARIAL_CODEC = ["--codec-adversarial-weight", "0.3", "--codec-adversarial-start", "1", "--codec-disc-window", "32",
                     "--codec-disc-width", "2", "--crop-samples", "256", "--lr-warmup", "0", "--lr-floor", "1",
                     "--stage", "vqvae", "--no-evaluate", "--log-every", "1"]


def test_an_adversarial_codec_keeps_its_discriminator_in_the_checkpoint_and_resumes_as_if_never_stopped(
        tmp_path, fsdd_dir, capsys):
    whole = speech_run(tmp_path, fsdd_dir, "whole", steps=4, extra=ADVERSARIAL_CODEC)
    halves = speech_run(tmp_path, fsdd_dir, "halves", steps=2, extra=ADVERSARIAL_CODEC)
    assert T.main(["--resume", str(halves), "--steps", "4"]) == 0
    with np.load(whole / "checkpoint.npz", allow_pickle=False) as a, np.load(halves / "checkpoint.npz",
                                                                              allow_pickle=False) as b:
        assert int(a["disc_opt.t"]) == 3 and a["disc.0.W"].shape == (2, 1, 4, 4)  # D trained at steps 1 to 3
        for k in a.files:
            if k != "wall_time_s":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    lines = [m for m in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert "disc_loss" not in lines[0] and all("disc_loss" in m for m in lines[1:])  # from step index 1
    assert T.main(["--data", "fsdd", "--data-dir", str(fsdd_dir), "--out", str(tmp_path / "short"), *TINY_CODEC,
                   *ADVERSARIAL_CODEC, "--crop-samples", "64"]) == 1
    assert "--crop-samples 64 is too short for the discriminator" in one_error_line(capsys)


@pytest.mark.parametrize("part, accuracy", [("critic", "speaker_critic_accuracy"), ("listener", "listener_accuracy")])
def test_a_codec_with_a_speaker_critic_or_listener_keeps_it_in_the_checkpoint_and_resumes_as_if_never_stopped(
        tmp_path, fsdd_dir, capsys, part, accuracy):
    extra = [f"--codec-speaker-{part}", "0.5", "--crop-samples", "256", "--stage", "vqvae", "--no-evaluate",
             "--log-every", "1"]
    whole = speech_run(tmp_path, fsdd_dir, "whole", steps=4, extra=extra)
    halves = speech_run(tmp_path, fsdd_dir, "halves", steps=2, extra=extra)
    assert T.main(["--resume", str(halves), "--steps", "4"]) == 0
    with np.load(whole / "checkpoint.npz", allow_pickle=False) as a, np.load(halves / "checkpoint.npz",
                                                                              allow_pickle=False) as b:
        assert int(a[f"{part}.adam.t"]) == 4 and f"{part}.weights.head.W" in a.files
        for k in a.files:
            if k != "wall_time_s":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    lines = [m for m in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert all(0 <= m[accuracy] <= 1 for m in lines)
    if part == "listener":                                             # it hears spectrograms at window 256
        assert T.main(["--data", "fsdd", "--data-dir", str(fsdd_dir), "--out", str(tmp_path / "short"), *TINY_CODEC,
                       *extra[:2], "--crop-samples", "128"]) == 1
        assert "--crop-samples 128 is too short for the speaker listener" in one_error_line(capsys)


def test_the_codecs_learning_rate_warms_up_decays_to_its_floor_and_a_resume_keeps_that_schedule(
        tmp_path, fsdd_dir, capsys, monkeypatch):
    """--lr after --lr-warmup steps, down linearly to --lr-floor times it at --steps, step by step
    as Adam takes them; a run resumed after the warm-up with other --steps is refused (its steps
    so far followed a decay to the old end), and with the same --steps it trains on."""
    seen, adam_step = [], V.Adam.step
    monkeypatch.setattr(V.Adam, "step", lambda self, grads, params: (seen.append(self.lr),
                                                                     adam_step(self, grads, params)))
    run = speech_run(tmp_path, fsdd_dir, steps=6, extra=("--lr", "0.01", "--lr-warmup", "2", "--stage", "vqvae",
                                                         "--no-evaluate"))
    # warm-up: (s + 1) / 2 of the peak; then from the peak at step 2 to 0.1 of it at step 6
    np.testing.assert_allclose(seen, [0.005, 0.01] + [0.01 * (0.1 + 0.9 * (6 - s) / 4) for s in range(2, 6)])
    assert T.main(["--resume", str(run), "--steps", "8"]) == 1
    assert "give --steps 6, or train a new run" in one_error_line(capsys)
    assert T.main(["--resume", str(run), "--steps", "6"]) == 0         # the same schedule: nothing left, measured again
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["lr_warmup"], saved["lr_floor"]) == (2, 0.1)


def test_speech_samples_with_its_own_guidance_unless_one_is_given(tmp_path, fsdd_dir, monkeypatch):
    """config.GUIDANCE: a speech run's prior, trained with label dropout, speaks with guidance 2.5
    (docs/audio.md), the images' 1.5; --guidance wins; a prior without label dropout takes none."""
    rules, sample_clips = [], S.sample_clips
    monkeypatch.setattr(S, "sample_clips", lambda *a: (rules.append(a[-1]), sample_clips(*a))[1])
    speech_run(tmp_path, fsdd_dir, "plain", steps=2, extra=("--no-evaluate",))
    speech_run(tmp_path, fsdd_dir, "given", steps=2, extra=("--no-evaluate", "--guidance", "3"))
    speech_run(tmp_path, fsdd_dir, "unguided", steps=2, extra=("--no-evaluate", "--prior-label-dropout", "0"))
    assert [r["guidance"] for r in rules] == [config.GUIDANCE["audio"], 3.0, 1.0]
    assert config.GUIDANCE == {"images": 1.5, "audio": 2.5}


def test_encode_writes_each_clips_codes_and_decode_turns_them_into_wavs(tmp_path, fsdd_dir, capsys):
    run = speech_run(tmp_path, fsdd_dir)
    out = tmp_path / "codes.npz"
    assert T.main(["encode", "--run", str(run), "--data", "fsdd", "--data-dir", str(fsdd_dir), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        codes, frames, names = f["codes"], f["frames"], list(f["names"])
    assert codes.shape[:2] == (30, 3) and names[0] == "0_ann_0.wav" and len(frames) == 30
    assert codes.min() == -1 and all((c[:, :n] >= 0).all() and (c[:, n:] == -1).all() for c, n in zip(codes, frames))
    wavs = tmp_path / "wavs"
    assert T.main(["decode", "--run", str(run), "--codes", str(out), "--out", str(wavs), "--stages", "2"]) == 0
    assert len(list(wavs.glob("*.wav"))) == 30
    assert len(D.read_wav(wavs / "0_ann_0.wav")) == 4 * frames[0]      # the clip's frames, a hop each
    assert T.main(["decode", "--run", str(run), "--codes", str(out), "--out", str(wavs)]) == 1
    assert "0_ann_0.wav exists; give --force" in one_error_line(capsys)
    assert T.main(["decode", "--run", str(run), "--codes", str(out), "--out", str(wavs), "--stages", "4"]) == 1
    assert "--stages 4: the codec has 3" in one_error_line(capsys)
    assert T.main(["decode", "--run", str(run), "--codes", str(out), "--out", str(tmp_path / "bob"), "--speaker",
                   "bob"]) == 0                                        # every clip in bob's voice
    own, as_bob = D.read_wav(wavs / "1_ann_0.wav"), D.read_wav(tmp_path / "bob" / "1_ann_0.wav")
    assert own.shape == as_bob.shape and not np.array_equal(own, as_bob)
    assert T.main(["decode", "--run", str(run), "--codes", str(out), "--out", str(wavs), "--speaker", "eve"]) == 1
    assert "--speaker eve is not one the codec knows (ann, bob)" in one_error_line(capsys)
    (tmp_path / "bad.npz").write_bytes(b"PK not a zip")
    assert T.main(["decode", "--run", str(run), "--codes", str(tmp_path / "bad.npz"), "--out", str(wavs)]) == 1
    assert "bad.npz" in one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--data", "fsdd", "--adversarial"], "--adversarial applies to images, not to --data fsdd"),
    (["--data", "fsdd", "--hidden", "8"], "--hidden applies to images, not to --data fsdd"),
    (["--data", "fsdd", "--prior-flip"], "--prior-flip applies to images"),
    (["--prior-stages", "2"], "--prior-stages applies to speech"),
    (["--data", "fsdd", "--prior-stages", "9", "--batch-size", "4"], "--prior-stages 9: the codec has 8"),
    (["--codec-stages", "4"], "--codec-stages applies to speech (--data fsdd), not to --data shapes"),
    (["--crop-samples", "512"], "--crop-samples applies to speech"),
    (["--data", "fsdd", "--codec-strides", "2,0"], "--codec-strides must be positive integers"),
    (["--data", "fsdd", "--crop-samples", "100"], "--crop-samples 100 must be a multiple of the codec's 32"),
    (["--data", "fsdd", "--prior-dilation", "3", "--batch-size", "4", "--prior-batch-size", "4"],
     "--prior-dilation=3 with kernel=3 would skip rows"),
    (["--data", "fsdd", "--prior-attention-every", "9", "--batch-size", "4", "--prior-batch-size", "4"],
     "--prior-attention-every=9 is more than layers=7"),
])
def test_flags_of_the_other_kind_of_data_and_bad_codec_settings_are_refused(tmp_path, fsdd_dir, capsys, argv, message):
    assert T.main([*argv, "--data-dir", str(fsdd_dir), "--out", str(tmp_path / "run")]) == 1
    assert message in one_error_line(capsys)


def test_image_commands_on_a_speech_run_and_decode_on_an_image_run_say_what_to_do(tmp_path, fsdd_dir, capsys):
    run = speech_run(tmp_path, fsdd_dir, steps=2)
    assert T.main(["sample", "--run", str(run)]) == 1
    assert "holds the audio codec" in one_error_line(capsys)
    assert T.main(["evaluate", "--run", str(run)]) == 1
    assert "holds the audio codec" in one_error_line(capsys)
    image_run = tmp_path / "images"
    image_run.mkdir()
    (image_run / "config.json").write_text(json.dumps({"train": {}, "model": {}, "priors": [{}]}))
    assert T.main(["decode", "--run", str(image_run), "--codes", "x.npz", "--out", str(tmp_path / "w")]) == 1
    assert "this run is of images" in one_error_line(capsys)
