r"""Image metrics in the feature space of a small shipped classifier, per image set (an FID for tiny images).

For each image set in :data:`fewstep.data.images.IMAGE_DATASETS` (``digits8``, ``digits16``) a small CNN
(:class:`ImageClassifier`) is trained once, deterministically (one thread, fixed seeds; ``python -m
fewstep.evaluation.image_features train``) on the set's train split and shipped as
``evaluation/weights/classifier_<set>.safetensors``, whose metadata hold its test accuracy and the real-vs-real
floors. Our own implementations (torchmetrics / torch-fidelity need Inception weights, which cannot be
downloaded here):

* :func:`frechet_image_distance`: :func:`fewstep.evaluation.metrics.frechet_distance` of the 64-d penultimate
  features, :math:`\|\mu_1-\mu_2\|^2 + \mathrm{tr}(C_1 + C_2 - 2(C_1C_2)^{1/2})`;
* :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019): with
  :math:`r_k(\phi)` the distance from a feature to its k-th nearest neighbour in its own set,
  precision = :math:`\frac{1}{|G|}\sum_{g\in G}[\exists r\in R: \|g - r\| \le r_k(r)]` (sample quality) and
  recall = the same with R and G swapped (mode coverage);
* class accuracy: the fraction of conditional samples that the classifier labels with their class.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.data.images import IMAGE_DATASETS, real_images
from fewstep.evaluation.digit_features import fit_classifier
from fewstep.evaluation.metrics import frechet_distance

__all__ = ["ImageClassifier", "train_classifier", "load_classifier", "features", "frechet_image_distance",
           "precision_recall", "image_metrics", "eval_noise", "fd_floor", "WEIGHTS_DIR", "FLOOR_N"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: Sample size at which the shipped floors are measured (and the default of :func:`image_metrics`).
FLOOR_N: dict[str, int] = {"digits8": 898, "digits16": 2000}
_EPOCHS = {"digits8": 40, "digits16": 3}


class ImageClassifier(nn.Module):
    """CNN 3x3 conv 32 - 32 - (stride 2) 64 - 64, 2x2 average pool, 256 -> 64 -> 10 (ReLU); features = the 64-d
    penultimate activations. Works for any (C, H, W) with H, W >= 4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features, shape (n, 64)."""
        return self.body(x.to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _check_name(name: str) -> tuple[int, int, int]:
    if name not in IMAGE_DATASETS:
        raise ValueError(f"no image classifier for {name!r}; expected one of {sorted(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name]


def train_classifier(name: str, seed: int = 0, epochs: int | None = None,
                     batch_size: int = 64) -> tuple[ImageClassifier, float]:
    """Train the classifier of image set ``name`` with Adam (lr 2e-3, weight decay 1e-4) on its train split,
    one thread and fixed seeds (deterministic); returns (net in eval mode, test-split accuracy)."""
    shape = _check_name(name)
    xtr, ytr = real_images(name, "train")
    xte, yte = real_images(name, "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = ImageClassifier(shape[0])
        gen = torch.Generator().manual_seed(seed)
        acc = fit_classifier(net, xtr, ytr, xte, yte, epochs or _EPOCHS[name], gen, batch_size)
    finally:
        torch.set_num_threads(threads)
    return net, acc


@lru_cache(maxsize=4)
def load_classifier(name: str) -> tuple[ImageClassifier, dict[str, str]]:
    """The shipped classifier of ``name`` (eval mode, frozen) and its metadata (test accuracy, floors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    shape = _check_name(name)
    path = WEIGHTS_DIR / f"classifier_{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {str(path)!r} are missing; run "
                                "`python -m fewstep.evaluation.image_features train`")
    net = ImageClassifier(shape[0])
    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return net.eval().requires_grad_(False), meta


@torch.no_grad()
def features(name: str, x: Tensor, batch: int = 1024) -> Tensor:
    """Classifier features (n, 64) of images ``x`` (n, C, H, W) of set ``name`` (float32, CPU)."""
    shape = _check_name(name)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name} features need images of shape (n, {', '.join(map(str, shape))}); "
                         f"got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf")
    net, _ = load_classifier(name)
    x = x.detach().cpu().float()
    return torch.cat([net.features(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def frechet_image_distance(name: str, x: Tensor, y: Tensor) -> float:
    """Fréchet distance between the classifier features of image sets ``x`` and ``y`` (set ``name``)."""
    return frechet_distance(features(name, x).double(), features(name, y).double())


def _kth_radius(f: Tensor, k: int) -> Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # k+1: the distance to itself (0) is the first


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (see the module docstring)."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall need more than k={k} samples per set; got {real.shape[0]}, {fake.shape[0]}")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(dim=1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def _reference(name: str, n: int, seed: int, split: str = "all") -> Tensor:
    x, _ = real_images(name, split)
    if n > x.shape[0]:
        raise ValueError(f"{name} has only {x.shape[0]} {split} images; asked for {n} reference images")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1_000_003 + seed))
    return x[perm[:n]]


def fd_floor(name: str, n: int | None = None, seed: int = 0, split: str = "all") -> dict[str, float]:
    """Real-vs-real floor: FD, precision and recall at sample size ``n`` (default :data:`FLOOR_N`).

    ``split="all"``: two disjoint random halves of all real images (what a perfect sampler gets against a
    reference drawn from all images). ``split="test"``: ``n`` random train images against the held-out test
    images (what a sampler that reproduces its training images gets against the test reference).
    """
    _check_name(name)
    n = int(n or FLOOR_N[name])
    gen = torch.Generator().manual_seed(seed)
    if split == "test":
        xtr, _ = real_images(name, "train")
        a_img, b_img = xtr[torch.randperm(xtr.shape[0], generator=gen)[:n]], _reference(name, n, seed, "test")
    elif split == "all":
        x, _ = real_images(name, "all")
        if not 2 <= n <= x.shape[0] // 2:
            raise ValueError(f"floor sample size must lie in [2, {x.shape[0] // 2}] for {name}; got {n}")
        perm = torch.randperm(x.shape[0], generator=gen)
        a_img, b_img = x[perm[:n]], x[perm[n:2 * n]]
    else:
        raise ValueError(f"unknown floor split {split!r}; expected 'all' or 'test'")
    a, b = features(name, a_img), features(name, b_img)
    p, r = precision_recall(b, a)
    return {"fd": frechet_distance(a.double(), b.double()), "precision": p, "recall": r}


def eval_noise(n: int, shape: Sequence[int], num_classes: int | None, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """The image evaluation noise (n, *shape) from generator seed ``seed`` and balanced labels i mod num_classes."""
    x1 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    return x1, (torch.arange(n) % num_classes if num_classes else None)


def image_metrics(name: str, x: Tensor, labels: Tensor | None = None, n_ref: int | None = None,
                  seed: int = 0, split: str = "all") -> dict[str, float]:
    """FD, precision, recall (vs ``n_ref`` real images of ``split``, default len(x)) and, given ``labels``,
    class accuracy."""
    ref = _reference(name, int(n_ref or x.shape[0]), seed, split)
    fx, fr = features(name, x), features(name, ref)
    p, r = precision_recall(fr, fx)
    out = {"fd": frechet_distance(fx.double(), fr.double()), "precision": p, "recall": r}
    if labels is not None:
        net, _ = load_classifier(name)
        with torch.no_grad():
            pred = torch.cat([net.head(fx[i:i + 1024]) for i in range(0, fx.shape[0], 1024)]).argmax(1)
        out["class_acc"] = float((pred == labels.cpu()).double().mean())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fewstep.evaluation.image_features train [--names digits8 digits16]``: retrain and ship weights."""
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(prog="python -m fewstep.evaluation.image_features")
    p.add_argument("command", choices=["train", "show"])
    p.add_argument("--names", nargs="+", default=sorted(IMAGE_DATASETS))
    args = p.parse_args(argv)
    for name in args.names:
        if args.command == "train":
            net, acc = train_classifier(name)
            WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
            path = WEIGHTS_DIR / f"classifier_{name}.safetensors"
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
                      metadata={"test_accuracy": f"{acc:.4f}", "train_seed": "0", "epochs": str(_EPOCHS[name])})
            load_classifier.cache_clear()
            floor = fd_floor(name)
            meta = {"test_accuracy": f"{acc:.4f}", "train_seed": "0", "epochs": str(_EPOCHS[name]),
                    "floor_n": str(FLOOR_N[name]), **{f"floor_{k}": f"{v:.4f}" for k, v in floor.items()}}
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
            load_classifier.cache_clear()
        print(name, json.dumps(load_classifier(name)[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
