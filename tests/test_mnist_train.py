"""`npcpu train --data.kind mnist --data.path DIR` trains on files in MNIST's own format.

The test writes the four gzipped IDX files itself: a small, learnable set of 28x28 uint8 images
(ten smooth prototype shapes, each image one of them shifted by up to two pixels, dimmed, with
noise), so that a reached accuracy says the pixels and labels were read in the right order.
"""

import json

import numpy as np

from npcpu.cli import main
from npcpu.data.mnist import load_mnist, write_idx

SIDE = 28


def prototypes(rng) -> np.ndarray:
    """(10, 28, 28) float in [0, 1]: each class three Gaussian blobs at random places."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    shapes = np.zeros((10, SIDE, SIDE))
    for c in range(10):
        for cy, cx, width in zip(rng.uniform(6, 22, 3), rng.uniform(6, 22, 3), rng.uniform(2, 4, 3)):
            shapes[c] += np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * width ** 2))
    return shapes / shapes.max(axis=(1, 2), keepdims=True)


def mnist_like(rng, shapes, count) -> tuple[np.ndarray, np.ndarray]:
    """(images (count, 28, 28) uint8, labels (count,) uint8), as MNIST stores them."""
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = np.empty((count, SIDE, SIDE), np.uint8)
    for i, label in enumerate(labels):
        shifted = np.roll(shapes[label], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        pixels = 255 * rng.uniform(0.6, 1.0) * shifted + rng.uniform(0, 70, (SIDE, SIDE))
        images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images, labels


def write_mnist_gz(directory, train: int, test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = prototypes(rng)
    for prefix, count in (("train", train), ("t10k", test)):
        images, labels = mnist_like(rng, shapes, count)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_the_written_files_are_real_mnist_format(tmp_path):
    write_mnist_gz(tmp_path, 50, 20)
    raw = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"  # gzip
    train, test = load_mnist(tmp_path), load_mnist(tmp_path, train=False)
    assert train.x.shape == (50, 784) and test.x.shape == (20, 784)
    assert train.x.dtype == np.uint8 and train.scale == np.float32(1 / 255)  # kept as stored
    x, _ = train.batch(np.arange(50))
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_npcpu_train_on_mnist_files_reaches_the_accuracy(tmp_path, capsys):
    data, run_dir = tmp_path / "mnist", tmp_path / "run"
    data.mkdir()
    write_mnist_gz(data, 3000, 1000)
    # the user's command, with a smaller model and the digits preset's optimizer for a short run
    assert main(["train", "--data.kind", "mnist", "--data.path", str(data), "--run-dir",
                 str(run_dir), "--model.hidden", "64", "--train.epochs", "4",
                 "--train.accumulation_steps", "1", "--schedule.warmup_steps", "10",
                 "--optim.name", "adamw", "--optim.lr", "3e-3", "--optim.lookahead", "false",
                 "--progress", "lines"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert final["eval_accuracy"] >= 0.95, final
    assert "final eval" in capsys.readouterr().out
