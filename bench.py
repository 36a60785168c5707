"""Benchmarks, as ratios against references measured in the same run (these machines are noisy).

    python bench.py                 # a table
    python bench.py --json          # the same figures as JSON
    python bench.py --quick         # fewer repetitions, for a smoke test
    OPENBLAS_NUM_THREADS=1 python bench.py   # one thread on both sides (a machine shared with other jobs)

Measured: the VQ-VAE training step (forward, backward, Adam) for three configurations, with
FLOPs counted from the layer shapes and the achieved rate as a fraction of this machine's
float32 matmul peak; the quantizer's nearest-neighbour search (time and peak extra memory);
a prior training step; fast against naive sampling. When PyTorch happens to be installed
(never a requirement) the same architecture, with the same weights, threads, dtype and batch,
is timed step for step beside ours, alternating, and the loss of the first step is compared.
"""
import argparse
import json
import os
import platform
import time
import tracemalloc

import numpy as np

import prior as P
import vqvae

try:  # optional: the reference we measure against
    import torch
except ImportError:
    torch = None


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
# the PyTorch reference: the same architecture, weights copied from ours


def torch_model(model, device):
    """nn modules mirroring a one-level model, with its weights -> (encoder, pre_quant, decoder,
    codebook). Activations NCHW as PyTorch expects."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.body = convert(block)

        def forward(self, x):
            return x + self.body(x)

    def convert_conv(layer):
        W = torch.tensor(vqvae.to_numpy(layer.params["W"]))
        (t, _), (l, _) = layer.padding
        if isinstance(layer, vqvae.Conv2d):
            m = nn.Conv2d(W.shape[1], W.shape[0], (layer.kh, layer.kw), layer.stride, (t, l))
        else:
            m = nn.ConvTranspose2d(W.shape[0], W.shape[1], (layer.kh, layer.kw), layer.stride, (t, l))
        with torch.no_grad():
            m.weight.copy_(W)
            m.bias.copy_(torch.tensor(vqvae.to_numpy(layer.params["b"])))
        return m

    def convert(seq):
        layers = []
        for layer in seq.layers:
            if isinstance(layer, vqvae.ResidualBlock):
                layers.append(Residual(vqvae.Sequential(*layer.layers)))
            elif isinstance(layer, vqvae.ReLU):
                layers.append(nn.ReLU())
            else:
                layers.append(convert_conv(layer))
        return nn.Sequential(*layers)

    if model.cfg.levels != 1:
        raise ValueError("the PyTorch mirror covers the one-level model")
    codebook = torch.tensor(vqvae.to_numpy(model.quantizer.codebook), device=device)
    return (convert(model.encoder).to(device), convert_conv(model.pre_quant).to(device),
            convert(model.decoder).to(device), codebook)


def torch_step_fn(model, x_nhwc, device):
    """One PyTorch training step of the same model (plain VQ or EMA, beta, Adam) -> (step, loss of step 1)."""
    enc, pre, dec, E = torch_model(model, device)
    cfg = model.cfg
    ema = cfg.quantizer == "ema"
    if not ema:
        E = torch.nn.Parameter(E)
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


# -----------------------------------------------------------------------------
# the benchmarks


CONFIGS = {  # name: (image shape H, W, C; model config)
    "a_28x28x1": ((28, 28, 1), dict(hidden=128, res_hidden=32, res_blocks=2, codebook_size=512, code_dim=64)),
    "b_32x32x3": ((32, 32, 3), dict(hidden=128, res_hidden=32, res_blocks=2, codebook_size=512, code_dim=64)),
    "c_default": ((32, 32, 3), dict(hidden=64, res_hidden=32, res_blocks=2, codebook_size=256, code_dim=32,
                                    quantizer="ema")),
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


def bench_prior(device, repeat):
    cfg = P.PriorConfig(codebook_size=512, channels=64, layers=8, kernel=3)
    prior = P.PixelCNN(cfg, device=device)
    codes = np.random.default_rng(0).integers(0, 512, (32, 8, 8))
    opt = vqvae.Adam(prior.params, lr=1e-3)
    t = timings(lambda: prior.train_step(codes, opt), prior.xp, repeat=repeat)
    return {"config": "K=512 p=64 L=8 k=3, batch 32 of 8x8", **t, "grids_per_s": 32 / t["median_s"]}


def bench_sampling(device, N, size):
    cfg = P.PriorConfig(codebook_size=512, channels=64, layers=8, kernel=3)
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
    args = ap.parse_args()
    xp = vqvae.backend(args.device)
    device = "gpu" if xp is not np else "cpu"
    repeat = 5 if args.quick else 20
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count())  # NumPy's BLAS threads, for torch too
    if torch is not None:
        torch.set_num_threads(threads)                                 # as many as NumPy's BLAS uses
    peak = matmul_peak(xp)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": threads, "device": device,
                          "numpy": np.__version__, "torch": torch.__version__ if torch is not None else None,
                          "float32_matmul_peak_gflops": peak},
              "training_step": [bench_training(name, device, args.batch, peak, repeat) for name in CONFIGS],
              "quantizer": [bench_quantizer(device, K, repeat) for K in (512, 8192)],
              "prior_step": bench_prior(device, repeat),
              "sampling": bench_sampling(device, 2 if args.quick else 4, 8 if args.quick else 16)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, device {m['device']}, numpy {m['numpy']}, torch {m['torch']}; "
          f"float32 matmul peak {peak:.0f} GFLOP/s")
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
    r = report["prior_step"]
    print(f"\nprior step ({r['config']}): {r['median_s'] * 1e3:.1f} ms median, {r['grids_per_s']:.0f} grids/s")
    r = report["sampling"]
    print(f"sampling ({r['config']}): fast {r['fast_s']:.2f} s, naive {r['naive_s']:.2f} s, "
          f"{r['speedup']:.1f}x, same codes: {r['same_codes']}")


if __name__ == "__main__":
    main()
