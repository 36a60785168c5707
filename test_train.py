"""train.py and runs.py: the command line, the run folder, checkpoints, exact resume, and bad
input of every kind (settings, flags, damaged or misplaced files, interruptions), each with one
clear line and nothing already saved lost."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import codes as C
import config
import datasets as D
import prior as P
import runs as R
import train as T
import vqvae as V
from conftest import (json_values, seeds, TINY, metric_lines, tiny_run, one_error_line, idx_bytes, write_mnist, tiny_config, read_png, mutate, damage)


# -----------------------------------------------------------------------------
# train.py: the run, checkpoints, resume, errors

def test_cli_run_writes_every_artefact(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), "--steps", "6", "--eval-every", "3",
                   "--log-every", "2", "--seed", "3", *TINY]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.npz", "recon_000003.png", "recon_000006.png",
                 "recon.png", "prior.npz", "samples.png", "summary.json", "report.html", "evaluation.json",
                 "judge_seed0.npz"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_mse", "val_psnr", "perplexity", "codes_used", "steps", "wall_time_s", "device",
                "prior_val_bits_per_code", "sample_time_s"):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["device"] == "cpu" and 0 < summary["codes_used"] <= 1
    assert np.isclose(summary["val_psnr"], 10 * np.log10(1 / summary["val_mse"]))
    assert 0 < summary["prior_val_bits_per_code"] < 10 and summary["sample_time_s"] > 0
    grid = read_png(run / "recon.png")
    assert grid.shape[2] == 3 and grid.shape[0] > 2 * 8                # originals over reconstructions
    assert read_png(run / "samples.png").shape[0] > 4 * 8              # four rows of samples (no labels)
    steps = [m["step"] for m in metric_lines(run) if "loss" in m]
    assert steps == [2, 3, 4, 6]                                       # every 2 steps, and before each evaluation
    assert [m["step"] for m in metric_lines(run, "prior") if "prior_val_bits_per_code" in m] == [2]
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 6 and "opt.m.encoder.0.W" in f.files
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["codebook_size"] == 16 and saved["train"]["steps"] == 6
    assert saved["train"]["seed"] == saved["model"]["seed"] == 3 and saved["priors"][0]["seed"] == 3
    assert saved["priors"][0]["codebook_size"] == 16 and saved["priors"][0]["layers"] == 2


# top_K 0: the top codebook has -K 16 codes too; factor and blocks None: the defaults (0.5, 2)
@pytest.mark.parametrize("top_K, factor, blocks", [(0, None, None), (3, 1.5, 1)])
def test_two_level_cli_run_writes_both_levels_and_their_priors(tmp_path, capsys, top_K, factor, blocks):
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    run = tmp_path / "run"
    assert T.main(["--data", str(tmp_path / "x.npy"), "--out", str(run), "--steps", "3", "--eval-every", "3",
                   "--levels", "2", "--prior-attention-every", "1", *TINY, "--top-codebook-size", str(top_K),
                   "--log-every", "1", *([] if factor is None else ["--bottom-prior-factor", str(factor)]),
                   *([] if blocks is None else ["--prior-cond-blocks", str(blocks)])]) == 0
    for name in ("recon.png", "recon_top.png", "top_prior.npz", "prior.npz", "samples.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("codes_used", "top_codes_used", "perplexity", "top_perplexity", "prior_val_bits_per_code", "top_only_mse",
                "top_prior_val_bits_per_code"):
        assert key in summary, key
    K = top_K or 16
    assert round(summary["top_codes_used"] * K) == summary["top_codes_used"] * K  # used codes over K_top, not 16
    bottom_steps = round(2 * (factor or 0.5))                          # TINY: --prior-steps 2
    assert summary["top_prior_steps"] == 2 and summary["prior_steps"] == bottom_steps
    for name, steps in (("prior", bottom_steps), ("top_prior", 2)):
        with np.load(run / f"{name}.npz", allow_pickle=False) as f:
            assert int(f["step"]) == steps, name
        assert len([m for m in metric_lines(run, name) if "loss" in m]) == steps, name
    priors = json.loads((run / "config.json").read_text())["priors"]
    assert priors[0]["attention_every"] == 1 and priors[0]["cond_codebook_size"] == 0
    assert priors[0]["codebook_size"] == K and priors[1]["codebook_size"] == 16
    assert priors[1]["cond_codebook_size"] == K and priors[1]["cond_upsample"] == 2
    assert priors[0]["cond_blocks"] == 0 and priors[1]["cond_blocks"] == (2 if blocks is None else blocks)
    # the flag is the bottom prior's setting (not the top's 0): changing it on resume is refused
    assert T.main(["--resume", str(run), "--prior-cond-blocks", str(priors[1]["cond_blocks"] + 1)]) == 1
    assert "cannot change --prior-cond-blocks when resuming" in one_error_line(capsys)
    assert read_png(run / "recon_top.png").shape[0] == (3 * (16 + 2) + 2) * 2  # originals, top only, both levels
    assert "top_only_mse" in (run / "report.html").read_text()        # charted beside val_mse
    out = tmp_path / "codes.npz"
    assert T.main(["encode", "--run", str(run), "--data", str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["top"].shape == (4, 2, 2) and f["bottom"].shape == (4, 4, 4)
        assert f["top"].max() < K and f["bottom"].max() < 16
    codes_out = tmp_path / "s.npz"
    assert T.main(["sample", "--run", str(run), "--codes-out", str(codes_out), "--rows", "1", "--per-row", "8"]) == 0
    with np.load(codes_out, allow_pickle=False) as f:
        assert f["top_codes"].shape == (8, 2, 2) and f["codes"].shape == (8, 4, 4)
        assert f["top_codes"].max() < K


ADVERSARIAL = ["--adversarial", "--disc-start", "2", "--disc-layers", "1", "--disc-width", "4", "--adam-beta1", "0.5",
               "--adam-beta2", "0.9"]


@pytest.mark.parametrize("quantizer, levels, extra", [("vq", 1, []), ("ema", 1, ["--restart-threshold", "2"]),
                                                     ("ema", 2, ["--kmeans-init"]), ("gumbel", 1, []),
                                                     ("ema", 2, ["--top-only-rate", "0.5", "--code-stride", "8", "--top-codebook-size", "8",
                                                                 "--bottom-prior-factor", "1.5"]),
                                                     ("ema", 1, ADVERSARIAL),
                                                     ("ema", 1, ["--l1-weight", "0.5", "--perceptual-weight", "0.2",
                                                                 "--perceptual-steps", "2"])])
def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path, quantizer, levels, extra):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 8 * levels, 8, 3), dtype=np.uint8))
    common = ["--data", str(tmp_path / "x.npy"), "--log-every", "1", "--eval-every", "4", "--quantizer", quantizer,
              "--levels", str(levels), "--prior-attention-every", str(levels - 1), *TINY, *extra,
              "--prior-warmup", "2", "--prior-decay-steps", "4", "--prior-flip", "--prior-dropout", "0.2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert T.main([*common, "--out", straight, "--steps", "8", "--prior-steps", "4"]) == 0
    assert T.main([*common, "--out", split, "--steps", "4", "--stage", "vqvae"]) == 0
    assert T.main(["--resume", split, "--steps", "8", "--prior-steps", "2"]) == 0   # VQ-VAE 4 -> 8, prior 0 -> 2
    assert T.main(["--resume", split, "--stage", "prior", "--prior-steps", "4"]) == 0  # prior 2 -> 4
    bottom = 4 * (1.5 if "--bottom-prior-factor" in extra else 0.5) if levels == 2 else 4
    for stage in ("vqvae", "prior", "top_prior")[:levels + 1]:
        a = [m["loss"] for m in metric_lines(straight, stage) if "loss" in m]
        b = [m["loss"] for m in metric_lines(split, stage) if "loss" in m]
        assert len(a) == len(b) == {"vqvae": 8, "prior": bottom, "top_prior": 4}[stage]
        assert a == b, stage                                           # bit for bit on CPU


def test_prior_learning_rate_warms_up_linearly_then_decays_linearly_to_a_tenth():
    cfg = config.TrainConfig(prior_lr=4e-3, prior_warmup=4, prior_decay_steps=12)
    lrs = [T.prior_lr_at(cfg, s) for s in range(15)]
    np.testing.assert_allclose(lrs[:4], [1e-3, 2e-3, 3e-3, 4e-3])    # (s + 1) / warmup of the peak
    np.testing.assert_allclose(lrs[4:], [4e-4 + 3.6e-3 * (12 - s) / 8 for s in range(4, 12)] + [4e-4] * 3)
    assert T.prior_lr_at(config.TrainConfig(prior_lr=1e-3, prior_warmup=0, prior_decay_steps=5), 0) == 1e-3
    old = config.TrainConfig(prior_lr=1e-3, prior_warmup=0, prior_steps=10)  # a config.json from before: decay_steps 0
    np.testing.assert_allclose(T.prior_lr_at(old, 5), 1e-3 * (0.1 + 0.9 * 5 / 10))
    with pytest.raises(ValueError, match="prior_warmup must be >= 0"):
        config.TrainConfig(prior_warmup=-1)
    stretched = [T.prior_lr_at(cfg, s, scale=3) for s in range(45)]    # a top prior of 3 times the steps
    np.testing.assert_allclose(stretched[2:12:3], lrs[:4])             # warm-up: 12 steps, to the peak at step 11
    np.testing.assert_allclose(stretched[12::3], lrs[4:])              # decay: to a tenth at step 36


def test_prior_training_set_adds_the_codes_of_the_mirrored_images_with_their_labels():
    model = V.make_model(V.Config(hidden=8, res_hidden=4, res_blocks=1, codebook_size=16, code_dim=4, levels=2), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(5)
    (top, bottom), both = T.prior_training_set(model, images, labels, mirror=True)
    plain, no_labels = T.prior_training_set(model, images, labels, mirror=False)
    assert top.shape == (10, 2, 2) and bottom.shape == (10, 4, 4)
    np.testing.assert_array_equal(both, np.r_[labels, labels])
    for level, codes in enumerate((top, bottom)):
        np.testing.assert_array_equal(codes[:5], plain[level])
        np.testing.assert_array_equal(codes[5:], C.encode_all(model, images[:, :, ::-1])[level])
    np.testing.assert_array_equal(no_labels, labels)
    assert T.prior_training_set(model, images, None, mirror=True)[1] is None


def test_mirroring_is_on_by_default_for_data_a_mirror_keeps_in_its_class_only(tmp_path):
    parser = T.build_parser()
    for data, expected in [("shapes", True), ("cifar10", True), ("mnist", False), ("fashion-mnist", False),
                           ("x.npy", False)]:
        argv = ["--data", data, "--out", str(tmp_path / data)]
        cfg = T.configs_from_args(parser.parse_args(argv))[0]
        assert cfg.prior_flip is expected, data
        assert cfg.prior_decay_steps == 0 and T.schedule_end(cfg) == cfg.prior_steps  # 0: at --prior-steps
    argv = ["--data", "mnist", "--prior-flip", "--prior-steps", "9", "--prior-decay-steps", "7"]
    cfg = T.configs_from_args(parser.parse_args(argv))[0]
    assert cfg.prior_flip and cfg.prior_decay_steps == 7


def test_prior_layers_and_attention_defaults_depend_on_the_levels(tmp_path):
    """One level: 7 gated layers and one attention layer after the last; two levels: 8 gated
    layers, attention after every 4th in the top prior only. Explicit flags win."""
    parser = T.build_parser()
    for flags, expected in [([], [(7, 7)]), (["--levels", "2"], [(8, 4), (8, 0)]),
                            (["--prior-attention-every", "0"], [(7, 0)]), (["--prior-layers", "5"], [(5, 5)]),
                            (["--levels", "2", "--prior-layers", "4"], [(4, 4), (4, 0)])]:
        argv = ["--out", str(tmp_path / "run"), *flags]
        _, model_cfg, settings, _, _ = T.configs_from_args(parser.parse_args(argv))
        priors = config.prior_configs(settings, model_cfg, num_classes=3, seed=0)
        assert [(p.layers, p.attention_every) for p in priors] == expected, flags
        assert len(P.PixelCNN(priors[0]).attention) == (priors[0].layers // priors[0].attention_every
                                                        if priors[0].attention_every else 0)


def test_the_priors_dilation_follows_the_data(tmp_path):
    """config.PRIOR_DILATION: adjacent rows for images, rows 2^l apart over speech's frames; the flag wins."""
    parser = T.build_parser()
    for flags, expected in [([], [1]), (["--levels", "2"], [1, 1]), (["--data", "fsdd"], [2]),
                            (["--data", "fsdd", "--prior-dilation", "1"], [1]), (["--prior-dilation", "2"], [2])]:
        _, model_cfg, settings, _, _ = T.configs_from_args(parser.parse_args(["--out", str(tmp_path / "run"), *flags]))
        assert [p.dilation for p in config.prior_configs(settings, model_cfg, num_classes=3, seed=0)] == expected, flags


def test_steps_batch_and_adam_defaults_follow_the_data_and_adversarial(tmp_path):
    """One table each (config.STEPS, BATCH, BETAS, LR, LR_WARMUP, LR_FLOOR, JUDGE_STEPS): images 3000
    steps of 32 with Adam (0.9, 0.999) at a constant 1e-3 and a judge of 1500 steps; --adversarial
    twice the steps with VQGAN's (0.5, 0.9); speech the codec's steps, batch, rate and its schedule,
    and judges. Explicit flags win; a config.json from before the schedule kept its rate constant."""
    parser = T.build_parser()
    audio_row = (config.STEPS["audio"], config.BATCH["audio"], 0.9, 0.999, config.LR["audio"], config.LR_WARMUP["audio"],
                 config.LR_FLOOR["audio"], config.JUDGE_STEPS["audio"])
    for flags, expected in [([], (3000, 32, 0.9, 0.999, 1e-3, 0, 1.0, 1500)),
                            (["--adversarial"], (6000, 32, 0.5, 0.9, 1e-3, 0, 1.0, 1500)),
                            (["--data", "fsdd"], audio_row),
                            (["--adversarial", "--steps", "10", "--batch-size", "4", "--adam-beta1", "0.7", "--lr", "0.01",
                              "--lr-warmup", "3", "--lr-floor", "0.5", "--judge-steps", "7"],
                             (10, 4, 0.7, 0.9, 0.01, 3, 0.5, 7))]:
        cfg = T.configs_from_args(parser.parse_args(["--out", str(tmp_path / "run"), *flags]))[0]
        assert (cfg.steps, cfg.batch_size, cfg.adam_beta1, cfg.adam_beta2, cfg.lr, cfg.lr_warmup, cfg.lr_floor,
                cfg.judge_steps) == expected, flags
    assert audio_row[5:7] == (100, 0.1)                                # docs/audio.md's schedule
    old = config.TrainConfig.from_dict({"data": "fsdd", "lr": 3e-3})   # a codec's config.json from before it
    assert (old.lr_warmup, old.lr_floor) == (0, 1.0) and T.vqvae_lr_at(old, 1999) == 3e-3
    plain = config.TrainConfig()
    assert [T.vqvae_lr_at(plain, s) for s in (0, 1500, 2999, 5000)] == [1e-3] * 4  # images: constant


def test_the_priors_warm_up_is_a_tenth_of_its_steps_for_images_and_speechs_own_for_speech(tmp_path):
    """config.PRIOR_STEPS and PRIOR_WARMUP: images 3000 steps warmed up over 300, and --prior-steps
    6000 alone gives the longer schedule of docs/first_run.md (600); speech 2000 over 600; an
    explicit --prior-warmup wins; a config.json from before the default holds its own."""
    parser = T.build_parser()
    for flags, expected in [([], (3000, 300)), (["--prior-steps", "6000"], (6000, 600)),
                            (["--data", "fsdd"], (config.PRIOR_STEPS["audio"], 600)),
                            (["--prior-steps", "6000", "--prior-warmup", "7"], (6000, 7))]:
        cfg = T.configs_from_args(parser.parse_args(["--out", str(tmp_path / "run"), *flags]))[0]
        assert (cfg.prior_steps, cfg.prior_warmup) == expected, flags
    assert config.TrainConfig.from_dict({"prior_steps": 6000}).prior_warmup == 600     # a config.json without it


@pytest.mark.parametrize("quantizer, flags, K", [("rvq", ["--rvq-stages", "3", "--kmeans-init", "--restart-threshold", "1"], 16),
                                                 ("fsq", ["--fsq-levels", "5,3"], 15), ("lfq", ["-K", "8"], 8),
                                                 ("gumbel", ["--gumbel-anneal-steps", "2"], 16)])
def test_cli_runs_encodes_and_samples_with_every_quantizer(tmp_path, tiny_data, quantizer, flags, K):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), "--steps", "4", "--eval-every", "4",
                   *TINY, "--quantizer", quantizer, *flags]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantizer"] == quantizer and 0 < summary["codes_used"] <= 1
    assert 1 <= summary["perplexity"] <= K and np.isfinite(summary["prior_val_bits_per_code"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["priors"][0]["codebook_size"] == K                   # the prior models the codes the quantizer emits
    S = 3 if quantizer == "rvq" else 1
    out = tmp_path / "codes.npy"
    assert T.main(["encode", "--run", str(run), "--data", tiny_data, "--out", str(out)]) == 0
    codes = np.load(out, allow_pickle=False)
    assert codes.shape[1:] == ((S, 2, 2) if S > 1 else (2, 2)) and 0 <= codes.min() and codes.max() < K
    assert T.main(["sample", "--run", str(run), "--codes-out", str(tmp_path / "s.npz"), "--rows", "1",
                   "--per-row", "3"]) == 0
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert f["codes"].shape == ((3, S, 2, 2) if S > 1 else (3, 2, 2))


def test_cli_names_bad_quantizer_options(tmp_path, tiny_data, capsys):
    common = ["--data", tiny_data, "--out", str(tmp_path / "run"), *TINY]
    assert T.main([*common, "--quantizer", "lfq", "-K", "12"]) == 1
    assert "lfq needs a codebook_size that is a power of 2" in capsys.readouterr().err
    assert T.main([*common, "--quantizer", "rvq", "--levels", "2"]) == 1
    assert "the priors do not model two levels of residual codes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main([*common, "--fsq-levels", "8,x"])
    assert "expected integers separated by commas, got '8,x'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_prior_stage_needs_a_finished_vqvae(tmp_path, tiny_data, capsys):
    run = str(tmp_path / "run")
    assert T.main(["--data", tiny_data, "--out", run, "--stage", "prior", *TINY]) == 1
    assert "--stage prior trains a prior for an existing run" in capsys.readouterr().err
    assert T.main(["--data", tiny_data, "--out", run, "--steps", "2", "--eval-every", "2", "--stage", "vqvae", *TINY]) == 0
    assert T.main(["--resume", run, "--stage", "prior", "--steps", "4"]) == 1
    assert "stopped at step 2 of 4: finish it first" in capsys.readouterr().err


def test_sample_command_draws_new_images_from_a_run(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), "--steps", "2", "--eval-every", "2", *TINY]) == 0
    out, codes_out = tmp_path / "s.png", tmp_path / "s.npz"
    assert T.main(["sample", "--run", str(run), "--out", str(out), "--codes-out", str(codes_out),
                   "--rows", "2", "--per-row", "3", "--temperature", "0.5"]) == 0
    codes = np.load(codes_out, allow_pickle=False)["codes"]
    assert codes.shape == (6, 2, 2) and codes.min() >= 0 and codes.max() < 16
    assert read_png(out).shape == ((2 * (8 + 2) + 2) * 2, (3 * (8 + 2) + 2) * 2, 3)
    assert T.main(["sample", "--run", str(tmp_path)]) == 1


def test_resume_refuses_to_change_the_model_and_fresh_runs_refuse_to_overwrite(tmp_path, tiny_data, capsys):
    run = str(tmp_path / "run")
    assert T.main(["--data", tiny_data, "--out", run, "--steps", "2", "--eval-every", "2", *TINY]) == 0
    assert T.main(["--data", tiny_data, "--out", run, "--steps", "2", *TINY]) == 1
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert T.main(["--resume", run, "--lr", "0.5"]) == 1
    assert "cannot change --lr when resuming" in capsys.readouterr().err
    assert T.main(["--resume", str(tmp_path)]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    R.save_npz(tmp_path / "checkpoint.npz", {"step": np.array(3)})

    def crash(fd):
        raise OSError("disk full")
    monkeypatch.setattr(R.os, "fsync", crash)
    with pytest.raises(R.UserError, match="cannot write .*checkpoint.npz \\(disk full\\); the checkpoint.npz that was there is kept"):
        R.save_npz(tmp_path / "checkpoint.npz", {"step": np.array(4)})
    with np.load(tmp_path / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]   # no .tmp left behind


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, tiny_data, monkeypatch, capsys):
    real_step = V.VQVAE.train_step
    calls = []

    def step_that_breaks(self, x, opt):
        stats = real_step(self, x, opt)
        calls.append(1)
        if len(calls) == 5:
            stats["loss"] = stats["loss"] * np.nan
        return stats
    monkeypatch.setattr(V.VQVAE, "train_step", step_that_breaks)
    run = tmp_path / "run"
    code = T.main(["--data", tiny_data, "--out", str(run), "--steps", "9", "--eval-every", "2",
                   "--log-every", "3", *TINY])
    assert code == 1
    assert "vqvae: the loss became nan at step 5" in capsys.readouterr().err
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 4 and all(np.all(np.isfinite(f[k])) for k in f.files if f[k].dtype.kind == "f")


def test_user_errors_exit_nonzero_with_one_line_and_no_traceback(tmp_path, tiny_data):
    (tmp_path / "bad.idx").write_bytes(b"junk")
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(10))
    cases = [(["--data", str(tmp_path / "missing.npy")], "no such file"),
             (["--data", "mnist", "--data-dir", str(tmp_path)], "truncated IDX"),
             (["--data", "imagenet"], "unknown dataset 'imagenet'"),
             (["--data", tiny_data, "-K", "0"], "--codebook-size must be >= 1, got 0"),
             (["--data", tiny_data, "--batch-size", "100"], "--batch-size 100 is larger than the 36 training images"),
             (["--data", tiny_data, "--prior-kernel", "2"], "kernel must be odd")]
    for args, message in cases:
        r = subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
        assert r.returncode == 1, args
        assert "Traceback" not in r.stderr and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, tiny_data):
    import signal
    import time
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", tiny_data, "--out", str(run), "--steps", "100000",
                             "--log-every", "1", *TINY], cwd=Path(__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted at step" in err
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        assert 0 < int(f["step"]) < 100000
    assert T.main(["--resume", str(run), "--steps", str(int(np.load(run / "checkpoint.npz")["step"]) + 2)]) == 0


def test_encode_command_writes_the_codes_the_api_decodes(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), "--steps", "2", "--eval-every", "2", *TINY]) == 0
    out = tmp_path / "codes.npy"
    assert T.main(["encode", "--run", str(run), "--data", tiny_data, "--split", "test", "--out", str(out)]) == 0
    codes = np.load(out, allow_pickle=False)
    model = V.VQVAE.load(run / "checkpoint.npz")
    images = D.load_dataset(tiny_data, ".")["test"]
    assert codes.shape == (4, 2, 2)
    np.testing.assert_array_equal(codes, model.encode(D.to_model(images)))
    assert model.decode(codes).shape == (4, 8, 8, 3)
    assert T.main(["encode", "--run", str(tmp_path), "--data", tiny_data, "--out", str(out)]) == 1


# -----------------------------------------------------------------------------
# bad input, tried as an adversary would: the command line and the run folder

def test_a_prior_is_never_paired_with_the_codes_of_another_vqvae_state(tmp_path, tiny_data, capsys):
    straight = tiny_run(tmp_path, tiny_data, "straight", steps=8)
    run = tiny_run(tmp_path, tiny_data)                                # VQ-VAE 4 steps, then its prior
    # the VQ-VAE trains on: the prior fitted to the old codes is trained anew, as in a run of 8 steps
    assert T.main(["--resume", str(run), "--steps", "8"]) == 0
    assert "prior.npz came from the codes of an earlier state of the VQ-VAE: trained anew" in capsys.readouterr().err
    a = [m["loss"] for m in metric_lines(straight, "prior") if "loss" in m]
    b = [m["loss"] for m in metric_lines(run, "prior") if "loss" in m]
    assert b[-len(a):] == a                                            # the new prior's losses are the straight run's
    sha = R.fingerprint(V.VQVAE.load(run / "checkpoint.npz"))
    assert R.checkpoint_note(run / "prior.npz", "vqvae_sha256") == sha
    # VQ-VAE only: the stale prior's figures leave the summary, and sampling from it is refused
    assert T.main(["--resume", str(run), "--steps", "10", "--stage", "vqvae"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert "prior_val_bits_per_code" not in summary and "sample_time_s" not in summary
    assert f"--resume {run} --stage prior" in summary["stale_priors"]
    capsys.readouterr()
    assert T.main(["sample", "--run", str(run)]) == 1
    assert "prior.npz was fitted to the codes of an earlier state of the VQ-VAE" in one_error_line(capsys)
    assert T.main(["--resume", str(run), "--stage", "prior"]) == 0     # trained anew, then usable again
    assert "stale_priors" not in json.loads((run / "summary.json").read_text())
    assert T.main(["sample", "--run", str(run), "--rows", "1", "--per-row", "2"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--prior-lr", "0"], "--prior-lr must be > 0, got 0.0"),
    (["--beta", "nan"], "beta must be a finite number, got nan"),
    (["--beta", "-1"], "--beta must be >= 0, got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--ema-decay", "1"], "--ema-decay must be in (0, 1), got 1.0"),
    (["--gumbel-temperature", "inf", "--quantizer", "gumbel"], "--gumbel-temperature must be a finite number, got inf"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--adversarial", "--disc-weight", "-1"], "--disc-weight must be >= 0, got -1.0"),
    (["--adversarial", "--disc-start", "-5"], "--disc-start must be >= 0, got -5"),
    (["--adversarial", "--disc-lr", "nan"], "--disc-lr must be a finite number, got nan"),
    (["--adversarial", "--disc-width", "0"], "--disc-width must be >= 1, got 0"),
    (["--adversarial", "--disc-layers", "2"], "--disc-layers 2 leaves no patch of a 8 x 8 image to judge: give fewer"),
    (["--bottom-prior-factor", "0"], "--bottom-prior-factor must be > 0, got 0.0"),
    (["--bottom-prior-factor", "2"], "--bottom-prior-factor 2.0 applies to --levels 2 only: add --levels 2"),
    (["--prior-cond-blocks", "-1"], "--prior-cond-blocks must be >= 0, got -1"),
    (["--prior-cond-blocks", "1"], "--prior-cond-blocks 1 applies to --levels 2 only: add --levels 2"),
])
def test_bad_settings_stop_the_run_before_anything_is_written(tmp_path, tiny_data, capsys, flags, message):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), *TINY, *flags]) == 1
    assert message in one_error_line(capsys)
    assert not run.exists()


def test_divergence_stops_saying_what_is_kept_and_never_saves_a_non_finite_state(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    with np.errstate(all="ignore"):
        code = T.main(["--data", tiny_data, "--out", str(run), "--lr", "1e9", "--steps", "20", *TINY])
    assert code == 1
    assert "No checkpoint of this stage was saved (the first comes at step 20)" in one_error_line(capsys)
    assert not (run / "checkpoint.npz").exists()
    with np.errstate(all="ignore"):
        code = T.main(["--data", tiny_data, "--out", str(tmp_path / "run2"), "--lr", "1e9", "--steps", "20",
                       "--eval-every", "1", *TINY])
    assert code == 1
    line = one_error_line(capsys)
    with np.load(tmp_path / "run2" / "checkpoint.npz", allow_pickle=False) as f:
        step = int(f["step"])
        assert all(np.isfinite(f[k]).all() for k in f.files if f[k].dtype.kind == "f")
    assert f"checkpoint.npz holds the last good state, step {step}" in line


def test_a_state_that_is_not_finite_is_never_saved(tmp_path):
    model = V.make_model(tiny_config())
    opt = V.Adam(model.params)
    model.params["decoder.0.W" if "decoder.0.W" in model.params else next(iter(model.params))][...] = np.inf
    with pytest.raises(V.NonFiniteError, match="holds NaN or infinite values"):
        R.save_checkpoint(tmp_path / "c.npz", model, opt, 1, 0.0)
    assert not (tmp_path / "c.npz").exists()


def test_resume_sees_flags_in_every_spelling_and_never_goes_back(tmp_path, tiny_data, capsys):
    run = tiny_run(tmp_path, tiny_data)
    config = (run / "config.json").read_bytes()
    for flags, message in [(["-K64"], "cannot change --codebook-size when resuming"),
                           (["--codebook-size=64"], "cannot change --codebook-size when resuming"),
                           (["--kmeans-init"], "cannot change --kmeans-init when resuming"),
                           (["--no-prior-labels", "--lr=0.1"], "cannot change --lr, --prior-labels when resuming"),
                           (["--adversarial", "--disc-weight", "2"], "cannot change --adversarial, --disc-weight when resuming"),
                           (["--steps", "2"], "is at step 4: --steps 2 would go back; give --steps 4 or more"),
                           (["--prior-steps", "1"], "prior.npz is at step 2: --prior-steps 1 would go back")]:
        assert T.main(["--resume", str(run), *flags]) == 1, flags
        assert message in one_error_line(capsys), flags
    for flags in (["--batch", "8"], ["--quant", "vq"]):                # abbreviations are not flags
        with pytest.raises(SystemExit) as e:
            T.main(["--resume", str(run), *flags])
        assert e.value.code == 2 and "unrecognized arguments" in one_error_line(capsys)
    assert (run / "config.json").read_bytes() == config               # nothing was rewritten


def corrupt(tmp_path, run, name, content):
    """A copy of `run` in which `name` is replaced by `content` (bytes, or None for a folder)."""
    import shutil
    copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(run, copy)
    (copy / name).unlink()
    (copy / name).mkdir() if content is None else (copy / name).write_bytes(content)
    return copy


def npy_header_only(shape):
    """An .npy whose header claims `shape` of uint8, followed by 16 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(16)


def test_every_damaged_or_misplaced_file_gives_one_line(tmp_path, tiny_data, capsys, monkeypatch):
    run = tiny_run(tmp_path, tiny_data)
    checkpoint = (run / "checkpoint.npz").read_bytes()
    (tmp_path / "afile").write_bytes(b"x")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("train.npy", npy_header_only((10**9, 10**9, 1, 1)))
        z.writestr("test.npy", npy_header_only((2, 2, 2)))
    (tmp_path / "huge.npz").write_bytes(buf.getvalue())
    (tmp_path / "huge.npy").write_bytes(npy_header_only((10**9, 10**9, 10, 3)))
    np.savez(tmp_path / "channels.npz", train=np.zeros((4, 8, 8, 3), np.uint8), test=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "empty.npz", train=np.zeros((0, 8, 8, 3), np.uint8), test=np.zeros((2, 8, 8, 3), np.uint8))
    mnist = tmp_path / "labels" / "mnist"
    write_mnist(mnist, gz=False)
    (mnist / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 10, 3], np.uint8)))
    cases = [
        (["--resume", str(corrupt(tmp_path, run, "checkpoint.npz", checkpoint[:len(checkpoint) // 2]))],
         "cannot resume from this checkpoint (BadZipFile"),
        (["sample", "--run", str(corrupt(tmp_path, run, "checkpoint.npz", checkpoint[:100]))], "cannot load the model"),
        (["sample", "--run", str(corrupt(tmp_path, run, "prior.npz", b"PK\x03\x04 junk"))], "prior.npz: cannot load"),
        (["--resume", str(corrupt(tmp_path, run, "prior.npz", checkpoint[:-30]))], "prior.npz: cannot resume"),
        (["--data", str(tmp_path / "huge.npz"), *TINY], "huge.npz: an array's header asks for more memory"),
        (["--data", str(tmp_path / "huge.npy"), *TINY], "huge.npy: damaged or truncated file"),
        (["--data", str(tmp_path / "channels.npz"), *TINY], "train images are (8, 8, 3) (H, W, C), test images (8, 8, 1)"),
        (["--data", str(tmp_path / "empty.npz"), *TINY], "empty.npz[train]: no images"),
        (["--data", "mnist", "--data-dir", str(tmp_path / "labels"), *TINY], "label 10 out of range [0, 10)"),
        (["--data", "mnist", "--data-dir", str(tmp_path / "afile"), *TINY], "--data-dir " + str(tmp_path / "afile") + ": not a folder"),
        (["--data", tiny_data, "--out", str(tmp_path / "afile"), *TINY], "a file of that name is in the way"),
        (["--resume", tiny_data], "not a run folder"),
        (["--resume", str(corrupt(tmp_path, run, "config.json", b'{"train": {"steps": "9"}, "model": {}, "priors": [{}]}'))],
         "unreadable run config (steps must be an integer, got '9')"),
        (["--resume", str(corrupt(tmp_path, run, "config.json", b'{"train": {}, "model": {}, "priors": []}'))],
         "0 prior configs for a model of 1 level(s)"),
        (["--resume", str(corrupt(tmp_path, run, "config.json", b"[" * 100000))], "unreadable run config (RecursionError"),
        (["--resume", str(corrupt(tmp_path, run, "config.json", b"\xff\xfe"))], "unreadable run config (UnicodeDecodeError"),
        (["--resume", str(corrupt(tmp_path, run, "config.json", None))], "unreadable run config (IsADirectoryError"),
        (["--resume", str(corrupt(tmp_path, run, "summary.json", b'{"vqvae_wall_time_s": "x"}')), "--steps", "6"],
         "vqvae_wall_time_s is 'x', not a number of seconds"),
        (["--resume", str(corrupt(tmp_path, run, "summary.json", None)), "--steps", "6"], "unreadable run summary"),
        (["sample", "--run", str(corrupt(tmp_path, run, "summary.json", b'{"image_hw": [8, "8"]}'))],
         "image_hw is [8, '8'], not a height and a width"),
        (["sample", "--run", str(run), "--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["sample", "--run", str(tiny_run(tmp_path, tiny_data, "no_prior", extra=["--stage", "vqvae"]))],
         "has no prior.npz yet: train it with python train.py --resume"),
        (["sample", "--run", str(run), "--out", str(tmp_path / "no" / "s.png")], "the folder " + str(tmp_path / "no")),
        (["encode", "--run", str(run), "--data", tiny_data, "--out", str(tmp_path)], "is a folder, not a file name"),
        (["encode", "--run", str(run), "--data", tiny_data, "--out", str(tmp_path / "c.npz")],
         "c.npz: this writes NPY data: give a name ending in .npy"),
        (["sample", "--run", str(run), "--out", str(tmp_path / "s.jpg")], "s.jpg: this writes PNG data"),
        (["sample", "--run", str(run), "--codes-out", str(tmp_path / "c.npy")], "give a name ending in .npz"),
        (["sample", "--run", str(run), "--per-row", "0"], "--per-row must be at least 1, got 0"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert T.main(args) == 1, args
        line = one_error_line(capsys)
        assert message in line, (args, line)
    def read_only(fd):                                                 # root writes anywhere: the error is simulated
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(R.os, "fsync", read_only)
    assert T.main(["--data", tiny_data, "--out", str(tmp_path / "ro"), *TINY]) == 1
    assert "cannot write " + str(tmp_path / "ro" / "config.json") + " (Permission denied)" in one_error_line(capsys)
    assert [p.name for p in (tmp_path / "ro").iterdir()] == [".lock"]  # no .tmp, and no training happened


def test_a_full_disk_at_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_data, capsys, monkeypatch):
    run = tiny_run(tmp_path, tiny_data, extra=["--stage", "vqvae"])
    real_fsync, calls = R.os.fsync, []

    def fill_up(fd):
        calls.append(fd)
        if len(calls) > 1:                                             # config.json goes through, the checkpoint not
            raise OSError(28, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(R.os, "fsync", fill_up)
    assert T.main(["--resume", str(run), "--steps", "6", "--stage", "vqvae"]) == 1
    line = one_error_line(capsys)
    assert "(No space left on device)" in line and "checkpoint.npz holds the last good state, step 4" in line
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 4
    assert not list(run.glob("*.tmp"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    np.save(folder / "tiny.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    assert T.main(["--data", str(folder / "tiny.npy"), "--out", str(folder / "run"), "--steps", "2",
                   "--eval-every", "2", *TINY]) == 0
    return folder / "run"


@given(kind=st.sampled_from(["bytes", "json", "field"]), value=json_values, seed=seeds)
def test_damaged_run_configs_load_or_give_a_user_error(finished_run, tmp_path_factory, kind, value, seed):
    """config.json as damaged bytes, as any JSON, or as the real one with one setting replaced."""
    run = tmp_path_factory.mktemp("cfg")
    good = (finished_run / "config.json").read_bytes()
    if kind == "bytes":
        text = mutate(good, "flipped", seed)
    elif kind == "json":
        text = json.dumps(value).encode()
    else:
        saved = json.loads(good)
        section = ["train", "model"][seed % 2]
        key = sorted(saved[section])[seed % len(saved[section])]
        saved[section][key] = value
        text = json.dumps(saved).encode()
    (run / "config.json").write_bytes(text)
    try:
        cfg, model_cfg, priors = config.saved_configs(run)
    except R.UserError:
        return
    assert isinstance(cfg, config.TrainConfig) and len(priors) == model_cfg.levels


@given(kind=damage, seed=seeds, which=st.sampled_from(["checkpoint.npz", "prior.npz"]))
def test_damaged_checkpoints_load_or_give_a_user_error(finished_run, tmp_path_factory, kind, seed, which):
    path = tmp_path_factory.mktemp("ckpt") / which
    path.write_bytes(mutate((finished_run / which).read_bytes(), kind, seed))
    cfg, model_cfg, priors = config.saved_configs(finished_run)
    model = V.make_model(model_cfg) if which == "checkpoint.npz" else P.PixelCNN(priors[0])
    for load in (lambda: R.load_checkpoint(path, model, V.Adam(model.params)),
                 lambda: R.load_model(path, type(model), "cpu")):
        try:
            load()
        except R.UserError:
            continue
        assert all(np.isfinite(v).all() for v in model.params.values())


def test_a_mistyped_command_line_is_one_line_with_exit_status_2(tmp_path):
    for args, message in [(["--batch", "4"], "unrecognized arguments: --batch 4"),
                          (["--levels", "3"], "argument --levels: invalid choice: 3"),
                          (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
                          (["sample", "--rows", "x"], "argument --rows: invalid int value: 'x'")]:
        r = subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True,
                           cwd=Path(__file__).parent, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, (args, r.stderr)


def test_sample_command_truncates_with_top_k_and_top_p(tmp_path, tiny_data, capsys):
    run = tiny_run(tmp_path, tiny_data)
    def codes(*flags):
        out = tmp_path / "s.npz"
        assert T.main(["sample", "--run", str(run), "--codes-out", str(out), "--rows", "2", "--per-row", "3", "--force",
                       *flags]) == 0
        return np.load(out, allow_pickle=False)["codes"]
    np.testing.assert_array_equal(codes("--top-k", "1"), codes("--temperature", "0"))   # one code left: the argmax
    np.testing.assert_array_equal(codes("--top-p", "1e-9"), codes("--temperature", "0"))
    capsys.readouterr()
    assert T.main(["sample", "--run", str(run), "--top-p", "0"]) == 1
    assert "--top-p must be in (0, 1], got 0.0" in one_error_line(capsys)
    assert T.main(["--resume", str(run), "--top-k", "-2"]) == 1
    assert "--top-k must be >= 0, got -2" in one_error_line(capsys)


def test_class_conditional_runs_train_with_label_dropout_and_sample_with_guidance(tmp_path, tiny_data, capsys):
    write_mnist(tmp_path / "mnist", n_train=8)                         # labelled: a class-conditional prior
    run = tiny_run(tmp_path, "mnist", steps=2, extra=("--data-dir", str(tmp_path)))
    saved = json.loads((run / "config.json").read_text())
    assert saved["priors"][0]["label_dropout"] == P.PriorConfig(num_classes=10).label_dropout and saved["train"]["guidance"] is None
    def codes(*flags):
        out = tmp_path / "s.npz"
        assert T.main(["sample", "--run", str(run), "--codes-out", str(out), "--per-row", "3", "--force", *flags]) == 0
        return np.load(out, allow_pickle=False)["codes"]
    np.testing.assert_array_equal(codes(), codes("--guidance", str(config.GUIDANCE["images"])))  # such a prior's default
    assert not np.array_equal(codes("--guidance", "1"), codes("--guidance", "4"))
    capsys.readouterr()
    assert T.main(["sample", "--run", str(run), "--guidance", "-1"]) == 1
    assert "--guidance must be in [0, 100.0], got -1.0" in one_error_line(capsys)
    unconditional = tmp_path / "plain"
    assert T.main(["--data", str(tiny_data), "--steps", "2", "--prior-steps", "2", "--out", str(unconditional),
                   "--no-prior-labels", "--no-evaluate", "--log-every", "1"]) == 0
    assert json.loads((unconditional / "config.json").read_text())["priors"][0]["label_dropout"] == 0
    capsys.readouterr()
    assert T.main(["sample", "--run", str(unconditional), "--guidance", "2"]) == 1
    assert "--guidance 2.0 needs a class-conditional prior trained with --prior-label-dropout > 0" \
        in one_error_line(capsys)
    assert T.main(["--data", str(tiny_data), "--out", str(tmp_path / "x"), "--no-prior-labels",
                   "--prior-label-dropout", "0.2"]) == 1
    assert "--prior-label-dropout 0.2 drops the class of a class-conditional prior" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()                               # refused before anything was written


def test_an_adversarial_run_keeps_its_discriminator_in_the_checkpoint_and_refuses_a_damaged_one(tmp_path, tiny_data, capsys):
    run = tiny_run(tmp_path, tiny_data, extra=[*ADVERSARIAL, "--stage", "vqvae", "--log-every", "1", "--disc-target", "0.6"])
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert int(arrays["disc_opt.t"]) == 2 and arrays["disc.0.W"].shape == (4, 3, 4, 4)  # D trained at steps 2 and 3
    lines = [m for m in metric_lines(run) if "loss" in m]              # steps 1 to 4, the training lines
    assert "gan" not in lines[1] and all(k in lines[2] for k in ("gan", "gan_weight", "disc_loss"))  # from step index 2
    steered = 1.0                                                      # w_t / w after the steps of D's losses
    for m in lines[2:]:
        steered = min(1.0, steered * np.exp(0.01 * (0.6 - m["disc_loss"])))
    assert steered < 1 and float(arrays["disc_scale"]) == pytest.approx(steered, rel=1e-5)
    assert T.main(["--resume", str(run), "--steps", "5", "--stage", "vqvae", "--log-every", "1"]) == 0
    last = [m for m in metric_lines(run) if "loss" in m][-1]
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:     # resumed from where it was steered to
        assert float(f["disc_scale"]) == pytest.approx(min(1.0, steered * np.exp(0.01 * (0.6 - last["disc_loss"]))),
                                                       rel=1e-5)
    assert json.loads((run / "summary.json").read_text())["adversarial"] is True
    del arrays["disc.2.W"]
    np.savez(run / "checkpoint.npz", **arrays)
    assert T.main(["--resume", str(run), "--steps", "6", "--stage", "vqvae"]) == 1
    assert "cannot resume from this checkpoint (ValueError: checkpoint has no array 'disc.2.W')" in one_error_line(capsys)
    assert T.main(["--resume", str(run), "--no-adversarial"]) == 1
    assert "cannot change --adversarial when resuming" in one_error_line(capsys)


@pytest.mark.parametrize("make, message", [
    (lambda: config.TrainConfig(lr=float("inf")), "lr must be a finite number, got inf"),
    (lambda: config.TrainConfig(temperature=-1), "temperature must be >= 0, got -1.0"),
    (lambda: config.TrainConfig(steps=0), "steps must be >= 1, got 0"),
    (lambda: config.TrainConfig(stage="both"), "stage must be one of vqvae, prior, all, got 'both'"),
])
def test_train_settings_are_refused_with_their_name_value_and_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_two_level_priors_model_the_top_and_the_bottom_codebook():
    cfg = tiny_config(levels=2, codebook_size=16, top_codebook_size=4)
    priors = config.prior_configs(dict(channels=4, layers=2, kernel=3, heads=1, dropout=0.0, attention_every=1),
                             cfg, num_classes=0, seed=0)
    assert [p.codebook_size for p in priors] == [4, 16] and priors[1].cond_codebook_size == 4
    assert [p.attention_every for p in priors] == [1, 0] and [p.cond_blocks for p in priors] == [0, 2]


def test_a_config_from_before_the_bottom_prior_factor_trains_its_priors_as_it_did():
    """--top-prior-factor M (the top prior M times --prior-steps) became --bottom-prior-factor 1/M
    of M times the steps: each prior's steps, warm-up and decay are what they were."""
    cfg = config.TrainConfig.from_dict({"prior_steps": 3000, "prior_warmup": 300, "prior_decay_steps": 3000,
                                   "top_prior_factor": 2})
    assert (cfg.prior_steps, cfg.prior_warmup, cfg.prior_decay_steps, cfg.bottom_prior_factor) == (6000, 600, 6000, 0.5)
    model = V.make_model(tiny_config(levels=2))
    assert T.prior_steps(cfg, model, "top_prior") == (6000, 1) and T.prior_steps(cfg, model, "prior") == (3000, 0.5)
    old = dict(prior_lr=2e-3, prior_warmup=300, prior_decay_steps=3000, prior_steps=3000)
    for step in (0, 299, 300, 1000, 2999, 3000, 5999):                 # the old schedule: the top's scaled by 2
        top_then = T.prior_lr_at(config.TrainConfig(**old), step, 2)
        bottom_then = T.prior_lr_at(config.TrainConfig(**old), step, 1)
        assert T.prior_lr_at(cfg, step, 1) == top_then and T.prior_lr_at(cfg, step, 0.5) == bottom_then
    assert config.TrainConfig.from_dict({"top_prior_factor": 1}).bottom_prior_factor == 1.0


# -----------------------------------------------------------------------------
# reliability, second pass: the command line in a process of its own, as a user runs it

HERE = Path(__file__).parent


def cli(*args, env=None, cwd=HERE):
    """python train.py ARGS in a process of its own -> (exit status, stderr), with no traceback."""
    r = subprocess.run([sys.executable, str(HERE / "train.py"), *map(os.fsdecode, args)], capture_output=True,
                       cwd=cwd, timeout=300, env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})})
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return r.returncode, err


def error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("train.py")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_second_process_is_refused_a_run_folder_and_a_killed_ones_lock_is_taken_over(tmp_path, tiny_data):
    import signal
    import time
    run, straight = tmp_path / "run", tmp_path / "straight"
    flags = ["--data", tiny_data, "--eval-every", "20", "--log-every", "10", "--stage", "vqvae", *TINY]
    first = subprocess.Popen([sys.executable, str(HERE / "train.py"), *flags, "--steps", "100000", "--out", str(run)], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.npz").is_file() and time.time() < deadline:   # it has saved once
            time.sleep(0.05)
        for args in ([*flags, "--out", str(run)], ["--resume", str(run)], ["sample", "--run", str(run)]):
            code, err = cli(*args)
            assert code == 1, (args, err)
            line = error_line(err)
            assert ("in use by another process (host" in line and f"process {first.pid}" in line) or \
                "already holds a run" in line, line
        first.send_signal(signal.SIGKILL)                              # killed: no lock is left behind
    finally:
        first.wait(timeout=60)
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:     # its files are whole
        step = int(f["step"])
    assert (run / ".lock").is_file() and step % 20 == 0 and step < 100000
    code, err = cli("--resume", str(run), "--steps", str(step + 40))   # the lock is taken over, the run resumes
    assert code == 0, err
    assert T.main([*flags, "--steps", str(step + 40), "--out", str(straight)]) == 0
    a = [m["loss"] for m in metric_lines(straight) if "loss" in m]
    b = [m["loss"] for m in metric_lines(run) if "loss" in m]           # the killed run's last lines, then the resumed
    assert len(a) >= 4 and b[-4:] == a[-4:]                            # its 40 steps, logged every 10: exact


def test_no_command_writes_over_a_run_folders_files_and_outputs_need_force(tmp_path, tiny_data):
    run = tiny_run(tmp_path, tiny_data)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for args, message in [(["sample", "--run", run, "--codes-out", run / "checkpoint.npz"], "checkpoint.npz: a file of the run folder"),
                          (["sample", "--run", run, "--codes-out", run / "prior.npz"], "prior.npz: a file of the run folder"),
                          (["sample", "--run", run, "--out", run / "samples.png", "--force"], "samples.png: a file of the run folder"),
                          (["encode", "--run", run, "--data", tiny_data, "--out", run / "x.npy"], None)]:
        code, err = cli(*args)
        if message is None:                                            # a new file beside them: written
            assert code == 0, err
            continue
        assert code == 1 and message in error_line(err), (args, err)
    assert all((run / name).read_bytes() == data for name, data in before.items())
    code, err = cli("encode", "--run", run, "--data", tiny_data, "--out", run / "x.npy")
    assert code == 1 and "x.npy: the file exists; give --force to write over it" in error_line(err)
    assert cli("encode", "--run", run, "--data", tiny_data, "--out", run / "x.npy", "--force")[0] == 0
    assert cli("sample", "--run", run, "--seed", "1")[0] == 0          # RUN/samples_seed1.png, its own default
    code, err = cli("sample", "--run", run, "--seed", "1")
    assert code == 1 and "samples_seed1.png: the file exists" in error_line(err)


def test_a_cut_last_line_of_metrics_is_repaired_on_resume(tmp_path, tiny_data):
    run = tiny_run(tmp_path, tiny_data, extra=["--stage", "vqvae", "--log-every", "1"])
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"stage": "vqvae", "st')                            # what a kill mid-write leaves
    code, err = cli("--resume", run, "--steps", "6", "--stage", "vqvae")
    assert code == 0 and "metrics.jsonl: its last line was cut short (22 bytes, a killed run?): removed" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(l), dict) for l in lines)         # every line whole: none glued to another
    assert [m["step"] for m in metric_lines(run) if "loss" in m][-2:] == [5, 6]


def test_a_full_disk_names_the_file_and_what_is_kept(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")                   # every write: No space left on device
    code, err = cli("--data", tiny_data, "--out", run, *TINY)
    line = error_line(err)
    assert code == 1 and f"cannot write {run / 'metrics.jsonl'} (No space left on device)" in line
    assert "No checkpoint of this stage was saved" in line


def test_sampling_settings_that_overflow_are_refused_and_no_codes_come_from_non_finite_probabilities(tmp_path, tiny_data):
    run = tiny_run(tmp_path, tiny_data)
    for flags, message in [(["--guidance", "1e308"], "--guidance must be in [0, 100.0], got 1e+308"),
                           (["--temperature", "1e-320"], "overflows the logits: give 0 (the most likely code)")]:
        code, err = cli("sample", "--run", run, *flags)
        assert code == 1 and message in error_line(err), err
        code, err = cli("evaluate", "--run", run, *flags)
        assert code == 1 and message in error_line(err), err
    assert not (run / "samples_seed0.png").exists()
    prior = P.PixelCNN(P.PriorConfig(codebook_size=4, channels=4, layers=1, attention_every=0))
    prior.head.layers[-1].params["b"][0] = np.inf                      # logits that are not finite
    for sampler in (P.sample, P.sample_naive):
        with pytest.raises(V.NonFiniteError, match="sampling probabilities were not finite"), np.errstate(all="ignore"):
            sampler(prior, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"guidance must be a number in \[0, 100.0\]"):
        P.sample(prior, 2, 2, 2, seed=0, guidance=1e3)


def test_more_prior_steps_on_resume_follow_the_schedule_or_are_refused(tmp_path, tiny_data):
    common = ["--data", tiny_data, "--steps", "2", "--eval-every", "2", *TINY, "--prior-warmup", "1", "--no-evaluate"]
    run = tmp_path / "run"
    assert T.main([*common, "--out", str(run), "--prior-steps", "4"]) == 0
    code, err = cli("--resume", run, "--stage", "prior", "--prior-steps", "6")
    assert code == 1 and "trained 4 steps of a learning rate that decays to a tenth at step 4" in error_line(err)
    fixed, straight = tmp_path / "fixed", tmp_path / "straight"           # an end given: the schedule is the same
    assert T.main([*common, "--out", str(fixed), "--prior-steps", "4", "--prior-decay-steps", "6"]) == 0
    assert T.main(["--resume", str(fixed), "--stage", "prior", "--prior-steps", "6"]) == 0
    assert T.main([*common, "--out", str(straight), "--prior-steps", "6", "--prior-decay-steps", "6"]) == 0
    assert [m["loss"] for m in metric_lines(fixed, "prior") if "loss" in m] == \
        [m["loss"] for m in metric_lines(straight, "prior") if "loss" in m]


def test_the_report_charts_the_prior_that_stands_after_it_was_trained_anew(tmp_path, tiny_data):
    from test_report import check_page
    run = tiny_run(tmp_path, tiny_data, extra=["--log-every", "1"])    # a prior of 2 steps
    assert T.main(["--resume", str(run), "--steps", "6", "--prior-steps", "3"]) == 0  # the VQ-VAE on: a prior anew
    rows = [m for m in metric_lines(run, "prior") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 1, 2, 3]                # both in the file
    points = check_page(run / "report.html").points
    assert points["training"] == [3] and points["held out"][-1] == 2  # the chart: the new prior's alone (steps 2, 3)


def test_the_device_variable_is_honoured_and_checked(tmp_path, tiny_data):
    code, err = cli("--data", tiny_data, "--out", tmp_path / "run", *TINY, env={"VQVAE_DEVICE": "bogus"})
    assert code == 1 and "VQVAE_DEVICE must be one of auto, cpu, gpu, got 'bogus'" in error_line(err)
    if V._gpu_problem() is not None:                                   # no GPU here: asked for, refused
        code, err = cli("--data", tiny_data, "--out", tmp_path / "run", *TINY, env={"VQVAE_DEVICE": "gpu"})
        assert code == 1 and "device 'gpu' was asked for, but" in error_line(err)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_paths_that_are_not_utf8_and_outsized_numbers_in_a_run_folder_break_nothing(tmp_path, tiny_data):
    run = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xff"))           # bytes a file system allows, not UTF-8
    code, err = cli("--data", tiny_data, "--out", run, *TINY, "--steps", "4", "--eval-every", "2")
    assert code == 0, err
    assert "run-?" in (run / "report.html").read_text(errors="replace")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "vqvae", "step": 5, "loss": 1' + "0" * 400 + '}\n')
        f.write('{"stage": "vqvae", "step": 1' + "0" * 400 + ', "loss": 1}\n')
        f.write("[" * 100000 + "\n")
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "priors": 3}))
    assert cli("report", "--run", run)[0] == 0
    good = tiny_run(tmp_path, tiny_data, "good")
    with open(good / "metrics.jsonl", "a") as f:
        f.write('{"stage": "vqvae", "step": 1' + "0" * 400 + ', "loss": 1}\n' + "[" * 100000 + "\n")
    assert cli("evaluate", "--run", good)[0] == 0
    assert cli("--resume", good, "--steps", "6")[0] == 0


def test_misleading_lines_now_say_what_is_wrong(tmp_path, tiny_data):
    (tmp_path / "text.npy").write_text("not numbers\n")
    code, err = cli("--data", tmp_path / "text.npy", "--out", tmp_path / "r")
    assert code == 1 and "text.npy: not a NumPy .npy file (it starts with b'not nu'" in error_line(err)
    run = tiny_run(tmp_path, tiny_data)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "image_hw": [10**9, 8]}))
    code, err = cli("sample", "--run", run)
    assert code == 1 and "image_hw is [1000000000, 8], not a height and a width" in error_line(err)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "prior.npz").unlink()
    (run / "prior.npz").mkdir()
    code, err = cli("sample", "--run", run)
    assert code == 1 and "prior.npz: not a file (a folder?); remove it, then train the prior" in error_line(err)
    (run / "prior.npz").rmdir()
    other = tiny_run(tmp_path, tiny_data, "other", extra=["-K", "8"])
    (run / "prior.npz").write_bytes((other / "prior.npz").read_bytes())
    code, err = cli("sample", "--run", run)
    assert code == 1 and "prior.npz models 8 codes, the VQ-VAE has 16 at that level: it is not this run's" in error_line(err)
    (run / "prior.npz").unlink()                                       # as the line says: then --stage prior works
    assert cli("--resume", run, "--stage", "prior")[0] == 0
