"""MNIST-like digits drawn from strokes: 28 x 28 grey, white on black, labelled 0-9, as an .npz
(train, test, train_labels, test_labels) for `python train.py --data digits.npz`."""
import sys
import numpy as np

def arc(cx, cy, rx, ry, a0, a1, n=10):
    t = np.radians(np.linspace(a0, a1, n))
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))

STROKES = {  # polylines in the unit square, y downwards
    0: [arc(.5, .5, .27, .38, 0, 360, 16)],
    1: [[(.36, .24), (.52, .1), (.52, .9)]],
    2: [arc(.5, .32, .25, .22, 190, 360, 8) + [(.25, .88), (.78, .88)]],
    3: [arc(.48, .3, .24, .2, 200, 450, 9), arc(.48, .7, .27, .2, 270, 520, 9)],
    4: [[(.64, .9), (.64, .1), (.2, .64), (.82, .64)]],
    5: [[(.76, .12), (.34, .12), (.3, .46)] + arc(.5, .66, .26, .24, 230, 500, 10)],
    6: [[(.7, .12)] + arc(.52, .66, .26, .24, 200, 560, 14)],
    7: [[(.22, .12), (.8, .12), (.42, .9)]],
    8: [arc(.5, .3, .21, .19, 0, 360, 12), arc(.5, .7, .26, .21, 0, 360, 12)],
    9: [arc(.5, .33, .25, .22, 0, 360, 12), [(.75, .33), (.7, .9)]],
}

def segments(label, rng):
    """The digit's strokes as segments (S, 2, 2), jittered and under a random affine map, in pixels."""
    th, sc, sh = rng.normal(0, .15), rng.uniform(.75, 1.0), rng.normal(0, .15)
    A = sc * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) @ np.array([[1, sh], [0, 1]])
    A[0] *= rng.uniform(.8, 1.1)                                   # wider or narrower
    shift = rng.normal(0, .04, 2)
    segs = []
    for line in STROKES[label]:
        p = np.array(line) + rng.normal(0, .025, (len(line), 2))
        p = (p - .5) @ A.T + .5 + shift
        segs += [(a, b) for a, b in zip(p[:-1], p[1:])]
    return np.array(segs) * 20 + 4                                 # a 20 x 20 box inside 28 x 28, as MNIST's

def draw(label, rng, size=28):
    s = segments(label, rng)
    yx = np.stack(np.meshgrid(np.arange(size) + .5, np.arange(size) + .5, indexing="xy"), -1).reshape(-1, 1, 2)
    a, d = s[None, :, 0], s[None, :, 1] - s[None, :, 0]
    t = np.clip(((yx - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0, 1)
    dist = np.linalg.norm(yx - (a + t[..., None] * d), axis=-1).min(1)
    width = rng.uniform(1.0, 1.9)
    ink = np.clip(width + .5 - dist, 0, 1)                         # antialiased stroke of that half-width
    return (255 * ink.reshape(size, size) * rng.uniform(.85, 1)).astype(np.uint8)

def make(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    return np.stack([draw(int(l), rng) for l in labels])[..., None], labels.astype(np.int64)

if __name__ == "__main__":
    xtr, ytr = make(10000, 0)
    xte, yte = make(2000, 1)
    np.savez(sys.argv[1], train=xtr, test=xte, train_labels=ytr, test_labels=yte)
