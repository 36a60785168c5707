"""evaluation.py: held-out figures, the judge network (its gradients, what it learns), the sample
metrics' formulas and floors, and `train.py evaluate`."""
import json

import numpy as np
from hypothesis import given, strategies as st

import codes as C
import datasets as D
import evaluation as E
import train as T
import vqvae as V
from conftest import (seeds, numerical_grad, rel_error, check_layer_grads, tiny_run, one_error_line)


def test_sizes_are_padded_and_metrics_use_only_the_real_pixels():
    images = np.random.default_rng(0).integers(0, 256, (3, 6, 7, 1), dtype=np.uint8)
    padded = D.pad_to_multiple(images, 4)
    assert padded.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(padded[:, :6, :7], images)

    class ExactOnRealPixels:                                           # perfect inside, wrong in the padding
        cfg = V.Config(in_channels=1, codebook_size=4)

        def encode(self, x):
            self.x = x
            return np.zeros((len(x), 2, 2), np.int64)

        def decode(self, codes):
            x = self.x.copy()
            x[:, 6:] = x[:, :, 7:] = 100.0
            return x

    ev = E.evaluate(ExactOnRealPixels(), padded, (6, 7), batch_size=2)
    assert ev["val_mse"] == 0 and ev["codes_used"] == 0.25


def test_two_level_evaluation_measures_the_reconstructions_from_the_top_codes_alone():
    model = V.make_model(V.Config(hidden=8, res_hidden=4, res_blocks=1, codebook_size=16, code_dim=4, levels=2), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    ev = E.evaluate(model, images, (16, 16), batch_size=4)
    top, bottom = C.encode_all(model, images)
    top_only = D.to_uint8(model.decode(top)) / 255                     # the bottom code vectors zeroed
    full = D.to_uint8(model.decode(top, bottom)) / 255
    np.testing.assert_allclose(ev["top_only_mse"], np.mean((top_only - images / 255) ** 2), rtol=1e-12)
    np.testing.assert_allclose(ev["val_mse"], np.mean((full - images / 255) ** 2), rtol=1e-12)
    assert "top_only_mse" not in E.evaluate(V.make_model(V.Config(hidden=8, codebook_size=16, code_dim=4), device="cpu"),
                                            images, (16, 16), batch_size=4)


# -----------------------------------------------------------------------------
# the judge and the sample metrics (train.py evaluate)

@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), seeds)
def test_mean_pool_gradient_matches_finite_differences(N, H, C, seed):
    rng = np.random.default_rng(seed)
    check_layer_grads(E.MeanPool(), rng.standard_normal((N, H, H + 1, C)), rng)


@given(st.integers(1, 6), st.integers(2, 5), seeds)
def test_softmax_cross_entropy_gradient_matches_finite_differences(M, K, seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((M, K)) * 3, rng.integers(0, K, M)
    loss, d = E.softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.isclose(loss, -np.log(p[np.arange(M), labels]).mean())
    assert rel_error(d, numerical_grad(lambda: E.softmax_cross_entropy(logits, labels)[0], logits)) < 1e-6


@given(st.integers(2, 3), st.sampled_from([4, 8]), st.booleans(), seeds)
def test_judge_gradients_match_finite_differences(K, H, sharpness, seed):
    """The class loss, and with sharpness the loss of telling the images from their blurred
    copies too (the second layer on the same features), against central differences."""
    judge = E.Judge(E.JudgeConfig(in_channels=2, num_classes=K, width=2, sharpness=sharpness, dtype="float64",
                                  seed=seed % 1000))
    rng = np.random.default_rng(seed)
    x, labels = rng.standard_normal((3, H, H, 2)), rng.integers(0, K, 3)
    blurred = rng.standard_normal((2, H, H, 2)) if sharpness else None
    judge.loss(x, labels, blurred)
    judge.backward()
    grads = {k: g.copy() for k, g in judge.grads.items()}
    assert grads.keys() == judge.params.keys() and ("sharp.W" in grads) == sharpness
    for k, p in judge.params.items():
        assert grads[k].dtype == p.dtype
        assert rel_error(grads[k], numerical_grad(lambda: float(judge.loss(x, labels, blurred)["loss"]), p), 1e-3) < 1e-5, k


def test_blur_is_a_normalised_gaussian_that_keeps_flat_images_and_spreads_an_edge():
    flat = np.full((1, 9, 9, 3), 77, np.uint8)
    assert np.array_equal(E.blur(flat, 1.3), flat) and E.blur(flat, 0) is flat
    edge = np.zeros((1, 1, 21, 1), np.uint8)
    edge[..., 10:, :] = 200                                            # a step from 0 to 200
    row = E.blur(edge, 1.5)[0, 0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] == 0 and row[-1] == 200 and 0 < row[9] < 100 < row[10] < 200
    assert abs(int(row[9]) + int(row[10]) - 200) <= 1                   # symmetric about the step


def two_classes(n, seed):
    """Dark and bright noisy images, labelled 0 and 1: a set any working classifier separates."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = np.clip(rng.normal(60 + 130 * labels[:, None, None, None], 30, (n, 8, 8, 3)), 0, 255).astype(np.uint8)
    return images, labels


def test_the_judge_learns_an_easily_separable_set_and_is_deterministic():
    x, y = two_classes(200, 0)
    x_test, y_test = two_classes(100, 1)
    data = {"train": x, "train_labels": y, "test": x_test, "test_labels": y_test, "num_classes": 2}
    a, b = E.train_judge(data, 3, 60, "cpu"), E.train_judge(data, 3, 60, "cpu")
    assert all(np.array_equal(v, b.params[k]) for k, v in a.params.items())   # the same seed, the same judge
    features, predicted = a.embed(x_test)
    assert features.shape == (100, 4 * a.cfg.width) and (predicted == y_test).mean() >= 0.95


def test_without_labels_the_judge_tells_the_rotation():
    square = {"train": np.zeros((4, 8, 8, 1), np.uint8)}
    assert E.judge_task(square) == (None, 4, True)
    assert E.judge_task({"train": np.zeros((4, 8, 12, 1), np.uint8)}) == (None, 2, True)  # half turns keep the shape
    img = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.uint8)
    turned = E.rotate(img, np.array([0, 1]))
    assert np.array_equal(turned[0], img[0]) and np.array_equal(turned[1], np.rot90(img[1], 1, axes=(0, 1)))


@given(st.integers(20, 60), st.integers(1, 5), seeds)
def test_frechet_distance_is_zero_to_itself_and_the_squared_shift_to_a_shifted_copy(n, F, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, F)) @ rng.standard_normal((F, F))      # correlated features
    v = rng.standard_normal(F)
    assert abs(E.frechet_distance(a, a)) < 1e-8 * max(1, (a.var(0) * n / (n - 1)).sum())
    assert np.isclose(E.frechet_distance(a, a + v), (v ** 2).sum(), rtol=1e-6, atol=1e-8)
    b = rng.standard_normal((n + 3, F)) * 2
    assert np.isclose(E.frechet_distance(a, b), E.frechet_distance(rng.permutation(a), rng.permutation(b)))
    assert np.isclose(E.frechet_distance(a, b), E.frechet_distance(b, a), rtol=1e-6)  # symmetric
    assert E.frechet_distance(a, b) > 0


@given(st.integers(8, 40), st.integers(1, 4), seeds)
def test_precision_and_recall_are_one_against_itself_zero_far_away_and_order_free(n, F, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, F)), rng.standard_normal((n + 5, F))
    assert E.precision_recall(a, a) == (1.0, 1.0)
    assert E.precision_recall(a, a + 1000) == (0.0, 0.0)
    assert E.precision_recall(a, b) == E.precision_recall(rng.permutation(a), rng.permutation(b))
    p, r = E.precision_recall(a, b)
    assert 0 < p <= 1 and 0 < r <= 1


def test_evaluate_writes_its_figures_and_keeps_its_judge(tmp_path, tiny_data, capsys):
    run = tiny_run(tmp_path, tiny_data)                                # ends with the evaluation
    summary = json.loads((run / "summary.json").read_text())
    for key in ("fd_samples_recon", "fd_samples_real", "fd_recon_halves", "fd_recon_real", "fd_real_halves", "precision_samples",
                "recall_samples", "evaluate_time_s"):
        assert key in summary and np.isfinite(summary[key]), key
    assert "accuracy_real" not in summary                              # no labels: a rotation judge, no classes
    judge = run / "judge_seed0.npz"
    stamp = judge.stat().st_mtime_ns
    capsys.readouterr()
    assert T.main(["evaluate", "--run", str(run), "--judge-steps", "2", "--images", "4"]) == 0
    assert judge.stat().st_mtime_ns == stamp                           # loaded, not trained again
    out = capsys.readouterr().out
    assert "samples to reconstructions" in out and "judge seed 0" in out
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["images"] == 4 and ev["judge_task"] == "rotation" and ev["fd_recon_halves"] >= 0
    assert T.main(["evaluate", "--run", str(run), "--judge-seed", "1", "--judge-steps", "2"]) == 0
    assert (run / "judge_seed1.npz").is_file()
    assert T.main(["evaluate", "--run", str(run), "--images", "1"]) == 1
    assert "--images must be at least 2, got 1" in one_error_line(capsys)


def test_evaluate_on_labelled_data_reports_the_judge_accuracy(tmp_path):
    x, y = two_classes(60, 0)
    data = {"train": x[:40], "train_labels": y[:40], "test": x[40:], "test_labels": y[40:], "num_classes": 2}
    judge = E.train_judge(data, 0, 40, "cpu")
    fig = E.sample_figures(judge, x[40:], x[40:], x[40:][::-1], y[40:], y[40:][::-1])
    assert fig["accuracy_real"] == fig["accuracy_recon"] == fig["accuracy_samples"] >= 0.9
    assert fig["fd_recon_real"] == fig["fd_real_halves"]               # the same images: the figure is its floor
    assert abs(fig["fd_samples_real"]) < 1e-5 * fig["fd_real_halves"]  # samples[:10] are real[10:], reversed
    assert (fig["precision_recon"], fig["recall_recon"]) == (fig["precision_real_halves"], fig["recall_real_halves"])


def test_blur_moves_every_figure_the_way_it_should_monotonically():
    """The instrument sees edges: real images blurred at two widths are further from the real
    images by every figure, the wider the further (the Frechet distance and the two-sample test
    up; precision, recall and the judge's accuracy down), and unblurred they are at the floor."""
    train, train_labels = D.make_shapes(2000, 16, seed=1)
    test, test_labels = D.make_shapes(400, 16, seed=2)
    data = {"train": train, "test": test, "train_labels": train_labels, "test_labels": test_labels, "num_classes": 3}
    judge = E.train_judge(data, 0, 400, "cpu")
    figures = [E.sample_figures(judge, test, E.blur(test, sigma), None, test_labels, two_sample_steps=300)
               for sigma in (0, 0.7, 1.4)]
    up, down = ("c2st_recon_real", "fd_recon_real"), ("precision_recon", "recall_recon", "accuracy_recon")
    for key in up + down:
        values = [f[key] for f in figures]
        assert values == sorted(values, reverse=key in down) and len(set(values)) == 3, (key, values)
    sharp = figures[0]
    assert sharp["fd_recon_real"] == sharp["fd_real_halves"] and abs(sharp["c2st_recon_real"] - 0.5) < 0.1
    assert abs(sharp["c2st_real_halves"] - 0.5) < 0.1 and figures[2]["c2st_recon_real"] > 0.9
