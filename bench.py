"""Benchmarks, as ratios against references measured in the same run (these machines are noisy).

    python bench.py                 # a table
    python bench.py --json          # the same figures as JSON
    python bench.py --quick         # fewer repetitions, for a smoke test
    python bench.py --only prior    # the prior alone (its training step, its samplers)
    python bench.py --only adversarial   # --adversarial's VQ-VAE step against the plain one
    python bench.py --only audio    # Conv1d against Conv2d at height 1, and the codec's step
    OPENBLAS_NUM_THREADS=1 python bench.py   # one thread on both sides (a machine shared with other jobs)

Measured: the VQ-VAE training step (forward, backward, Adam) for three configurations, with
FLOPs counted from the layer shapes and the achieved rate as a fraction of this machine's
float32 matmul peak; the quantizer's nearest-neighbour search (time and peak extra memory);
a training step of the prior that `python train.py` trains; fast against naive sampling; the
VQ-VAE step of `--adversarial` against the plain one (docs/decoder.md); the audio codec's 1-D
convolution against the 2-D one at height 1, and its training step (docs/audio.md). When
PyTorch happens to be installed (never a requirement) the same architecture (the VQ-VAE's and
the prior's), with the same weights, threads, dtype and batch, is timed step for step beside
ours, alternating, and the loss before the first step is compared.
"""
import argparse
import json
import os
import platform
import time
import tracemalloc

import numpy as np

import audio
import datasets
import prior as P
import speech
import config
import train
import vqvae

try:  # optional: the reference we measure against
    import torch
    import torch_modules
except ImportError:
    torch = torch_modules = None


# -----------------------------------------------------------------------------
# timing


def sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def timings(fn, xp=np, warmup=3, repeat=20):
    """Seconds per call of fn, after warm-up: median and the 10th / 90th percentiles."""
    for _ in range(warmup):
        fn()
    sync(xp)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(xp)
        ts.append(time.perf_counter() - t)
    return {"median_s": float(np.median(ts)), "p10_s": float(np.percentile(ts, 10)),
            "p90_s": float(np.percentile(ts, 90))}


def interleaved(fns, syncs, warmup=3, repeat=20, block=5):
    """Time several functions in alternating blocks of `block` calls, so that changes in the
    machine's load hit all of them alike -> a timings() dict per function. A pause between
    blocks lets the previous library's worker threads stop spinning (OpenBLAS and OpenMP both
    busy-wait for a while after a parallel region)."""
    for fn, s in zip(fns, syncs):
        for _ in range(warmup):
            fn()
        s()
    ts = [[] for _ in fns]
    for _ in range(-(-repeat // block)):
        for i, (fn, s) in enumerate(zip(fns, syncs)):
            time.sleep(0.2)
            for _ in range(block):
                t = time.perf_counter()
                fn()
                s()
                ts[i].append(time.perf_counter() - t)
    return [{"median_s": float(np.median(t)), "p10_s": float(np.percentile(t, 10)),
             "p90_s": float(np.percentile(t, 90))} for t in ts]


def matmul_peak(xp, n=2048, repeat=10):
    """This machine's float32 matmul rate (GFLOP/s): the median of n x n x n products."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=np.float32)
    b = a.T.copy()
    return 2 * n ** 3 / timings(lambda: a @ b, xp, warmup=2, repeat=repeat)["median_s"] / 1e9


# -----------------------------------------------------------------------------
# FLOPs counted from the layer shapes (multiply-adds x 2; what the architecture needs, not
# what a particular implementation spends)


def conv_flops(layer, x_shape):
    """Forward FLOPs of a Conv2d or ConvTranspose2d on an input of x_shape, and its output shape."""
    N, H, W, C = x_shape
    (t, b), (l, r) = layer.padding
    k, s = (layer.kh, layer.kw), layer.stride
    if isinstance(layer, vqvae.Conv2d):
        O = layer.params["W"].shape[0]
        Ho, Wo = (H + t + b - k[0]) // s + 1, (W + l + r - k[1]) // s + 1
        return 2 * N * Ho * Wo * O * C * k[0] * k[1], (N, Ho, Wo, O)
    O = layer.params["W"].shape[1]
    Ho, Wo = (H - 1) * s + k[0] - t - b, (W - 1) * s + k[1] - l - r
    return 2 * N * H * W * C * O * k[0] * k[1], (N, Ho, Wo, O)


def sequential_flops(seq, x_shape):
    """(forward FLOPs, backward FLOPs, output shape). Backward: the weight gradient and, unless
    the layer skips it, the input gradient, each as many FLOPs as the forward."""
    fwd = bwd = 0
    for layer in seq.layers:
        if isinstance(layer, vqvae.Sequential):
            f, b, _ = sequential_flops(layer, x_shape)
        elif isinstance(layer, (vqvae.Conv2d, vqvae.ConvTranspose2d)):
            f, x_out = conv_flops(layer, x_shape)
            b = f * (1 + getattr(layer, "input_grad", True))
            x_shape = x_out
        else:
            f = b = 0
        fwd, bwd = fwd + f, bwd + b
    return fwd, bwd, x_shape


def model_flops(model, x_shape):
    """FLOPs of one training step of a one-level model: encoder, the M x K distances, decoder,
    forward and backward."""
    fe, be, z_shape = sequential_flops(vqvae.Sequential(*model.encoder.layers, model.pre_quant), x_shape)
    fd, bd, _ = sequential_flops(model.decoder, z_shape)
    M = z_shape[0] * z_shape[1] * z_shape[2]
    fq = 2 * M * model.cfg.code_dim * model.cfg.codebook_size
    return fe + be + fd + bd + fq


# -----------------------------------------------------------------------------
# the PyTorch reference: the same architecture (torch_modules.py), weights copied from ours


def torch_step_fn(model, x_nhwc, device):
    """One PyTorch training step of the same model (plain VQ or EMA, beta, Adam) -> (step, loss of step 1)."""
    net = torch_modules.mirror(model).to(device)
    enc, pre, dec, E = net.encoder, net.pre_quant, net.decoder, net.quantizer.codebook  # E: a parameter for vq
    cfg = model.cfg
    ema = cfg.quantizer == "ema"
    counts, sums = torch.ones(cfg.codebook_size, device=device), E.detach().clone()
    params = list(enc.parameters()) + list(pre.parameters()) + list(dec.parameters()) + ([] if ema else [E])
    opt = torch.optim.Adam(params, lr=2e-4)
    x = torch.tensor(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)), device=device)

    def step():
        z = pre(enc(x)).permute(0, 2, 3, 1)                             # (N, h, w, D)
        z_flat = z.reshape(-1, cfg.code_dim)
        codes = ((E * E).sum(1) - 2 * z_flat @ E.t()).argmin(1)
        z_q = E[codes]
        commitment = ((z_flat - z_q.detach()) ** 2).mean()
        vq = cfg.beta * commitment + (0 if ema else ((z_q - z_flat.detach()) ** 2).mean())
        z_st = z_flat + (z_q - z_flat).detach()                          # straight-through
        x_hat = dec(z_st.reshape(z.shape).permute(0, 3, 1, 2))
        loss = ((x_hat - x) ** 2).mean() + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema:
            with torch.no_grad():
                onehot = torch.nn.functional.one_hot(codes, cfg.codebook_size).to(z_flat.dtype)
                counts.mul_(cfg.ema_decay).add_(onehot.sum(0), alpha=1 - cfg.ema_decay)
                sums.mul_(cfg.ema_decay).add_(onehot.t() @ z_flat, alpha=1 - cfg.ema_decay)
                n = counts.sum()
                E.copy_(sums / ((counts + cfg.ema_eps) / (n + cfg.codebook_size * cfg.ema_eps) * n)[:, None])
        return loss

    first_loss = float(step().detach())
    return step, first_loss


def torch_prior_step_fn(prior, codes, labels, device, lr):
    """One PyTorch training step of the same prior (mean cross-entropy, Adam at lr) -> (step,
    loss before any step). That loss is taken in evaluation mode (no dropout), to compare with
    ours at train=False: with dropout the two draw different masks."""
    net = torch_modules.mirror(prior).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    codes = torch.tensor(codes, device=device)
    labels = None if labels is None else torch.tensor(labels, device=device)
    loss_fn = torch.nn.functional.cross_entropy                        # mean -log softmax over N h w, in nats

    net.eval()
    with torch.no_grad():
        first_loss = float(loss_fn(net(codes, labels), codes))
    net.train()

    def step():
        loss = loss_fn(net(codes, labels), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, first_loss


# -----------------------------------------------------------------------------
# the benchmarks


CONFIGS = {  # name: (image shape H, W, C; model config)
    "a_28x28x1": ((28, 28, 1), dict(hidden=128, res_hidden=32, res_blocks=2, codebook_size=512, code_dim=64,
                                    quantizer="vq")),
    "b_32x32x3": ((32, 32, 3), dict(hidden=128, res_hidden=32, res_blocks=2, codebook_size=512, code_dim=64,
                                    quantizer="vq")),
    "c_default": ((32, 32, 3), {}),                                   # vqvae.Config(): train.py's model
}


def bench_training(name, device, batch, peak, repeat):
    (H, W, C), kw = CONFIGS[name]
    if H % 4:                                                          # as train.py does: pad 28 -> 28 (fine), else edge-pad
        raise ValueError(f"{name}: {H} is not a multiple of 4")
    model = vqvae.VQVAE(vqvae.Config(in_channels=C, **kw), device=device)
    xp = model.xp
    x = np.random.default_rng(0).random((batch, H, W, C)).astype(np.float32) - 0.5
    x_dev = xp.asarray(x)
    opt = vqvae.Adam(model.params, lr=2e-4)
    ours_first = float(model.forward(x_dev, train=False)["loss"])      # before any step, for the comparison
    fns, syncs = [lambda: model.train_step(x_dev, opt)], [lambda: sync(xp)]
    result = {"config": name, "batch": batch, "flops_per_step": model_flops(model, (batch, H, W, C))}
    if torch is not None:
        tdev = "cuda" if xp is not np else "cpu"
        step, torch_first = torch_step_fn(model, x, tdev)
        result["first_loss_ours"], result["first_loss_torch"] = ours_first, torch_first
        fns.append(step)
        syncs.append(torch.cuda.synchronize if tdev == "cuda" else (lambda: None))
    times = interleaved(fns, syncs, repeat=repeat)
    t = times[0]["median_s"]
    result.update(ours=times[0], images_per_s=batch / t, gflops=result["flops_per_step"] / t / 1e9)
    result["fraction_of_matmul_peak"] = result["gflops"] / peak
    if torch is not None:
        result["torch"] = times[1]
        result["ratio_ours_over_torch"] = t / times[1]["median_s"]
    return result


def bench_quantizer(device, K, repeat):
    xp = vqvae.backend(device)
    init = vqvae.uniform_init(np.random.default_rng(0), xp, "float32")
    vq = vqvae.VectorQuantizer(K, 64, init=init)
    z = xp.asarray(np.random.default_rng(1).standard_normal((32 * 8 * 8, 64)), dtype=np.float32)
    t = timings(lambda: vq.nearest(z), xp, repeat=repeat)
    if xp is np:
        tracemalloc.start()
        vq.nearest(z)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        pool = xp.get_default_memory_pool()
        pool.free_all_blocks()
        before = pool.used_bytes()
        vq.nearest(z)
        peak = pool.total_bytes() - before
    M = z.shape[0]
    return {"N": M, "D": 64, "K": K, **t, "peak_extra_bytes": int(peak),
            "peak_over_N_K_floats": peak / (M * K * 4), "N_K_D_floats_bytes": M * K * 64 * 4}


def default_prior_run():
    """The prior that `python train.py` trains with no flags, from the configs' own defaults so
    that the benchmark follows them -> (PriorConfig, batch, grid (h, w), Adam's lr)."""
    cfg, model_cfg = config.TrainConfig(), vqvae.Config()
    if cfg.data != "shapes":                                           # the others are downloads
        raise ValueError(f"bench.py reads the default data's image size and classes from the shapes "
                         f"generator, but train.py's default data is now {cfg.data!r}")
    data = datasets.shapes_dataset(n_train=1, n_test=1)                # one image each: the size and classes
    num_classes = data["num_classes"] if cfg.prior_labels else 0
    prior_cfg = config.prior_configs({}, model_cfg, num_classes, cfg.seed)[0]  # the top-most (or only) level
    H, W = data["train"].shape[1:3]
    grid = (H // model_cfg.downsample, W // model_cfg.downsample * model_cfg.codes_per_position)
    return prior_cfg, cfg.prior_batch_size, grid, cfg.prior_lr


def bench_prior(device, repeat):
    """A training step of the default run's prior; beside it (when installed) the same prior in
    PyTorch, alternating, and the loss of both before any step."""
    cfg, batch, (h, w), lr = default_prior_run()
    prior = P.PixelCNN(cfg, device=device)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, cfg.codebook_size, (batch, h, w))
    labels = rng.integers(0, cfg.num_classes, batch) if cfg.num_classes else None
    opt = vqvae.Adam(prior.params, lr=lr)
    ours_first = float(prior.loss(codes, labels)["loss"])             # before any step, no dropout
    fns, syncs = [lambda: prior.train_step(codes, opt, labels)], [lambda: sync(prior.xp)]
    after = ", ".join(str(l + 1) for l in prior.attention) or "none"   # gated layers (from 1) followed by attention
    result = {"config": f"K={cfg.codebook_size} p={cfg.channels} L={cfg.layers} k={cfg.kernel}, attention after "
                        f"layer {after}, {cfg.num_classes} classes, dropout {cfg.dropout}, batch {batch} of {h}x{w}",
              "batch": batch}
    if torch is not None:
        tdev = "cuda" if prior.xp is not np else "cpu"
        step, torch_first = torch_prior_step_fn(prior, codes, labels, tdev, lr)
        result.update(first_loss_ours=ours_first, first_loss_torch=torch_first,
                      first_loss_relative_difference=abs(ours_first - torch_first) / abs(torch_first))
        fns.append(step)
        syncs.append(torch.cuda.synchronize if tdev == "cuda" else (lambda: None))
    times = interleaved(fns, syncs, repeat=repeat)
    result.update(ours=times[0], grids_per_s=batch / times[0]["median_s"])
    if torch is not None:
        result["torch"] = times[1]
        result["ratio_ours_over_torch"] = times[0]["median_s"] / times[1]["median_s"]
    return result


def bench_adversarial(repeat):
    """The default run's VQ-VAE step against the step `--adversarial` takes once its discriminator
    has started (the discriminator's step, the decoder's extra backward for the adaptive weight),
    built as train.py builds them, timed alternating -> ms each and their ratio."""
    steps = {}
    for name, argv in (("plain", []), ("adversarial", ["--adversarial", "--disc-start", "0"])):
        cfg, model_cfg, settings, _, _ = train.configs_from_args(train.build_parser().parse_args(argv))
        data, model_cfg, _ = train.load_data(cfg, model_cfg, settings, False)
        model, opt, gan = train.make_vqvae(cfg, model_cfg, data)
        x = datasets.to_model(data["train_padded"][:cfg.batch_size])
        if gan is not None:                                            # a step after disc_start: D trained and used
            steps[name] = lambda gan=gan, opt=opt, x=x: gan.train_step(x, opt, gan.disc_opt, step=1)
        else:
            steps[name] = lambda model=model, opt=opt, x=x: model.train_step(x, opt)
    xp = vqvae.backend("auto")
    times = interleaved(list(steps.values()), [lambda: sync(xp)] * 2, repeat=repeat)
    return {"plain": times[0], "adversarial": times[1],
            "ratio_adversarial_over_plain": times[1]["median_s"] / times[0]["median_s"]}


def bench_audio(device, repeat, batch=16):
    """The codec's layers and step: a stride-1 convolution of kernel 7 over time (a residual unit's,
    forward and backward) as audio.Conv1d and as vqvae.Conv2d with a 1 x 7 kernel on images of
    height 1, at the codec's three widths (NumPy layers); then a training step of the default codec on `batch`
    crops of train.py's length."""
    rows, rng = [], np.random.default_rng(0)
    for C, T in ((16, 2048), (32, 1024), (64, 256)):
        c1 = audio.Conv1d(C, C, 7, padding="same")
        c2 = vqvae.Conv2d(C, C, (1, 7), padding=((0, 0), (3, 3)))
        c2.params["W"][...] = c1.params["W"][:, :, None, :]
        c2.params["b"][...] = c1.params["b"]
        x, dy = (rng.standard_normal((batch, T, C)).astype(np.float32) for _ in range(2))
        t1, t2 = interleaved([lambda: c1.backward(dy) if c1.forward(x) is not None else None,
                              lambda: c2.backward(dy[:, None]) if c2.forward(x[:, None]) is not None else None],
                             [lambda: None] * 2, repeat=repeat)
        rows.append({"channels": C, "T": T, "batch": batch, "conv1d": t1, "conv2d_height_1": t2,
                     "ratio_1d_over_2d": t1["median_s"] / t2["median_s"]})
    cfg, crop = audio.CodecConfig(), config.TrainConfig(data="fsdd").crop_samples
    codec = audio.Codec(cfg, device=device)
    opt = vqvae.Adam(codec.params, lr=1e-3)
    waves = [rng.standard_normal(crop * 2).astype(np.float32) * 0.1 for _ in range(batch)]
    x = codec.xp.asarray(speech.crops(waves, 0, 0, batch, crop)[0])
    step = timings(lambda: codec.train_step(x, opt), codec.xp, repeat=max(3, repeat // 4))
    return {"layers": rows, "codec_step": {"config": f"C={cfg.channels} strides {cfg.strides} D={cfg.code_dim} "
                                                     f"{cfg.stages}x{cfg.codebook_size} codes, {batch} crops of {crop}",
                                           **step, "clips_per_s": batch / step["median_s"]}}


def bench_sampling(device, N, size):
    cfg = P.PriorConfig(codebook_size=512, channels=64, layers=8, kernel=3, attention_every=0)  # gated layers only
    prior = P.PixelCNN(cfg, device=device)
    P.sample(prior, N, 2, 2, seed=0), P.sample_naive(prior, N, 2, 2, seed=0)  # warm-up: CuPy compiles kernels on first use
    sync(prior.xp)
    t = time.perf_counter()
    fast = P.sample(prior, N, size, size, seed=1)
    sync(prior.xp)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    naive = P.sample_naive(prior, N, size, size, seed=1)
    sync(prior.xp)
    t_naive = time.perf_counter() - t
    return {"config": f"K=512 p=64 L=8 k=3, {N} samples of {size}x{size}", "fast_s": t_fast, "naive_s": t_naive,
            "speedup": t_naive / t_fast, "same_codes": bool((vqvae.to_numpy(fast) == vqvae.to_numpy(naive)).all())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller sampling grid")
    ap.add_argument("--batch", type=int, default=32, help="batch of the training-step configurations")
    ap.add_argument("--only", choices=["vqvae", "prior", "adversarial", "audio"],
                    help="the VQ-VAE (training step, quantizer), the prior (training step, sampling), "
                         "--adversarial's step, or the audio codec, alone")
    args = ap.parse_args()
    xp = vqvae.backend(args.device)
    device = "gpu" if xp is not np else "cpu"
    repeat = 5 if args.quick else 20
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count())  # NumPy's BLAS threads, for torch too
    if torch is not None:
        torch.set_num_threads(threads)                                 # as many as NumPy's BLAS uses
    vqvae_part, prior_part = args.only in (None, "vqvae"), args.only in (None, "prior")
    peak = matmul_peak(xp) if vqvae_part else None                     # the training steps' "of peak"
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": threads, "device": device,
                          "numpy": np.__version__, "torch": torch.__version__ if torch is not None else None,
                          "float32_matmul_peak_gflops": peak}}
    if vqvae_part:
        report["training_step"] = [bench_training(name, device, args.batch, peak, repeat) for name in CONFIGS]
        report["quantizer"] = [bench_quantizer(device, K, repeat) for K in (512, 8192)]
    if prior_part:
        report["prior_step"] = bench_prior(device, repeat)
        report["sampling"] = bench_sampling(device, 2 if args.quick else 4, 8 if args.quick else 16)
    if args.only in (None, "adversarial"):
        report["adversarial"] = bench_adversarial(repeat)
    if args.only in (None, "audio"):
        report["audio"] = bench_audio(device, repeat)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, device {m['device']}, numpy {m['numpy']}, torch {m['torch']}"
          + (f"; float32 matmul peak {peak:.0f} GFLOP/s" if peak else ""))
    if vqvae_part:
        print_vqvae(report)
    if prior_part:
        print_prior(report)
    if "adversarial" in report:
        a = report["adversarial"]
        print(f"\n{'VQ-VAE step':14s} plain {a['plain']['median_s'] * 1e3:6.1f} ms  --adversarial "
              f"{a['adversarial']['median_s'] * 1e3:6.1f} ms  adversarial/plain {a['ratio_adversarial_over_plain']:5.2f}")
    if "audio" in report:
        print_audio(report["audio"])


def print_vqvae(report):
    print(f"\n{'training step':14s} {'batch':>5s} {'median ms':>10s} {'p10-p90 ms':>13s} {'img/s':>7s} "
          f"{'GFLOP/s':>8s} {'of peak':>8s} {'torch ms':>9s} {'ours/torch':>10s}")
    for r in report["training_step"]:
        o = r["ours"]
        line = (f"{r['config']:14s} {r['batch']:5d} {o['median_s'] * 1e3:10.1f} "
                f"{o['p10_s'] * 1e3:6.1f}-{o['p90_s'] * 1e3:<6.1f} {r['images_per_s']:7.0f} {r['gflops']:8.1f} "
                f"{r['fraction_of_matmul_peak']:8.0%}")
        if "torch" in r:
            line += f" {r['torch']['median_s'] * 1e3:9.1f} {r['ratio_ours_over_torch']:10.2f}"
        print(line)
    print(f"\n{'nearest code':14s} {'N':>5s} {'D':>3s} {'K':>5s} {'median ms':>10s} {'peak extra MB':>14s} {'/ (N K floats)':>15s}")
    for r in report["quantizer"]:
        print(f"{'':14s} {r['N']:5d} {r['D']:3d} {r['K']:5d} {r['median_s'] * 1e3:10.2f} "
              f"{r['peak_extra_bytes'] / 2**20:14.1f} {r['peak_over_N_K_floats']:15.2f}")


def print_prior(report):
    """The prior's step (ours against torch) and its samplers (fast against naive), a row each:
    the time of ours, of the reference, and their ratio."""
    s, r = report["prior_step"], report["sampling"]
    print(f"\n{'prior':14s} {'ours':>9s} {'reference':>16s} {'ratio':>17s}  config")
    line = f"{'training step':14s} {s['ours']['median_s'] * 1e3:6.1f} ms"
    if "torch" in s:
        line += f" {'torch':>7s} {s['torch']['median_s'] * 1e3:6.1f} ms {'ours/torch':>11s} {s['ratio_ours_over_torch']:5.2f}"
    else:
        line += f" {'(no torch)':>16s} {'':17s}"
    print(f"{line}  {s['config']}")
    print(f"{'sampling':14s} {r['fast_s']:7.2f} s {'naive':>7s} {r['naive_s']:7.2f} s {'naive/fast':>11s} "
          f"{r['speedup']:5.1f}  {r['config']}, same codes: {r['same_codes']}")
    if "torch" in s:
        print(f"prior loss before any step: ours {s['first_loss_ours']:.7f}, torch {s['first_loss_torch']:.7f}, "
              f"relative difference {s['first_loss_relative_difference']:.1e}")


def print_audio(r):
    print(f"\n{'conv over time':14s} {'C':>3s} {'T':>5s} {'batch':>5s} {'Conv1d ms':>10s} {'Conv2d h=1 ms':>14s} {'1d/2d':>6s}")
    for row in r["layers"]:
        print(f"{'k7, fwd+bwd':14s} {row['channels']:3d} {row['T']:5d} {row['batch']:5d} "
              f"{row['conv1d']['median_s'] * 1e3:10.2f} {row['conv2d_height_1']['median_s'] * 1e3:14.2f} "
              f"{row['ratio_1d_over_2d']:6.2f}")
    c = r["codec_step"]
    print(f"{'codec step':14s} {c['median_s'] * 1e3:.0f} ms ({c['clips_per_s']:.0f} clips/s)  {c['config']}")


if __name__ == "__main__":
    main()
