"""Over-fit check: eager Xception and its fused copy trained side by side on a few real photographs.

The project's seed validated its Xception by over-fitting 100 ImageNet images; this is the same
check, offline and reproducible. The photographs are the ones scikit-image ships inside its wheel
(nothing is downloaded), one class per photograph, each sample a random crop of it with a random
flip and a small colour jitter, all drawn from ``--seed``. The eager model and a fused copy start
from the same weights and take the same batches in the same order, in train mode: their first losses
agree to rounding, after which the curves drift apart as far as any two fp32 runs of this network
that differ only in summation order (see :func:`run`), both falling towards zero. The run prints both
curves, their largest gap, and plots them.

    python -m xception_fast.overfit [--epochs 8] [--device cuda] [--out overfit.png]
"""
import argparse
import copy
import sys
import time

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import Xception

__all__ = ["PHOTOGRAPHS", "load_photographs", "build_dataset", "run", "plot_losses", "main"]

# Real photographs that scikit-image loads from files inside the installed package. Its other
# photographs (eagle, lily, skin, kidney, brain, ...) are fetched over the network through pooch and
# must not be used here.
PHOTOGRAPHS = {
    "astronaut": skimage.data.astronaut,
    "camera": skimage.data.camera,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "coins": skimage.data.coins,
    "retina": skimage.data.retina,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_photographs(classes=len(PHOTOGRAPHS)):
    """The first ``classes`` photographs as (name, float32 [3, H, W] tensor in [0, 1]); grey ones
    repeated to three channels."""
    if not 1 <= classes <= len(PHOTOGRAPHS):
        raise ValueError(f"classes must be in [1, {len(PHOTOGRAPHS)}] (one per photograph), got {classes}")
    photographs = []
    for name, load in list(PHOTOGRAPHS.items())[:classes]:
        image = np.asarray(load())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0
        photographs.append((name, image))
    return photographs


def _augment(image, size, rng):
    """One random square crop (half to all of the short side), resized, maybe flipped, jittered."""
    _, height, width = image.shape
    side = int(rng.uniform(0.5, 1.0) * min(height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = image[:, top:top + side, left:left + side].unsqueeze(0)
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    brightness, contrast, saturation = rng.uniform(0.9, 1.1, size=3)
    crop = crop * brightness
    crop = (crop - crop.mean()) * contrast + crop.mean()
    grey = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2]).unsqueeze(0)
    crop = (crop - grey) * saturation + grey
    return crop.clamp(0.0, 1.0)


def build_dataset(classes=10, samples_per_class=10, size=71, seed=0):
    """``classes * samples_per_class`` augmented crops, normalised with the ImageNet statistics.

    Returns ``(x [N, 3, size, size] float32, y [N] int64, class names)``, samples grouped by class;
    the same arguments give the same tensors.
    """
    if size < 71:
        raise ValueError(f"size must be at least 71 (Xception's smallest input), got {size}")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be at least 1, got {samples_per_class}")
    rng = np.random.default_rng(seed)
    xs, ys, names = [], [], []
    for label, (name, image) in enumerate(load_photographs(classes)):
        names.append(name)
        for _ in range(samples_per_class):
            xs.append(_augment(image, size, rng))
            ys.append(label)
    x = (torch.stack(xs) - _MEAN) / _STD
    return x.contiguous(), torch.tensor(ys, dtype=torch.int64), names


def plot_losses(eager_losses, fused_losses, path, steps_per_epoch=None, title=None):
    """Both loss curves and their per-step gap, as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.arange(1, len(eager_losses) + 1)
    eager, fused = np.asarray(eager_losses), np.asarray(fused_losses)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.plot(steps, eager, label="eager", linewidth=2.5, alpha=0.6)
    top.plot(steps, fused, label="fused", linewidth=1.0, linestyle="--", color="black")
    top.set_yscale("log")
    top.set_ylabel("cross-entropy loss (log scale)")
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    if title:
        top.set_title(title)
    gap = np.abs(eager - fused)
    # A zero gap has no place on a log axis; it is drawn at the floor of the axis instead.
    floor = gap[gap > 0].min() / 10 if (gap > 0).any() else 1e-12
    bottom.plot(steps, np.maximum(gap, floor), marker=".", color="tab:red")
    bottom.set_yscale("log")
    bottom.set_ylabel("|loss eager - loss fused|")
    bottom.set_xlabel("step")
    bottom.grid(True, which="both", alpha=0.3)
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, len(steps), steps_per_epoch):
            for ax in (top, bottom):
                ax.axvline(boundary + 0.5, color="grey", linewidth=0.5)
    fig.savefig(path, dpi=100)
    return path


def run(epochs=8, batch_size=10, size=71, seed=0, device="cpu", backend="auto", lr=5e-4, classes=10,
        samples_per_class=10, out=None, progress=True, log=tqdm.write):
    """Train an eager Xception and its fused copy side by side; returns a dict of results.

    Both start from the weights ``Xception`` draws under ``torch.manual_seed(seed)`` (the caller's
    random state is left as it was), use Adam with learning rate ``lr`` annealed to zero over the run
    (cosine), and take the same shuffled batches (reshuffled each epoch from ``seed``). The result
    holds the per-step losses (``eager_losses``, ``fused_losses``), the largest absolute and relative
    gap between them, the fuse report, the wall time and, when ``out`` is given, the path of the PNG
    plot written there. ``log`` takes the progress lines (each epoch's mean losses and largest gap).

    The losses agree to rounding at step 1 only. The gradients of that step already differ by more
    in some tensors (README, Training): where rounding puts a pre-activation on the other side of
    zero or breaks a max-pool tie, the two models take different ReLU / argmax decisions. So the
    weights move apart and the curves drift as any two fp32 runs of this network in different
    summation orders do (an eager channels_last copy drifts as far from eager).
    """
    from .fusion import fuse

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    device = torch.device(device)
    x, y, names = build_dataset(classes, samples_per_class, size, seed)
    x, y = x.to(device), y.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        eager = Xception(num_classes=len(names))
    eager = eager.to(device).train()
    fused, report = fuse(copy.deepcopy(eager), backend=backend)
    fused.train()
    models = {"eager": eager, "fused": fused}
    steps_per_epoch = -(-len(x) // batch_size)
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=lr) for name, model in models.items()}
    # Annealing lets the last steps settle instead of bouncing on batch-statistics noise.
    schedules = {name: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
                 for name, optimizer in optimizers.items()}
    losses = {name: [] for name in models}
    shuffle = torch.Generator().manual_seed(seed)
    log(f"{len(x)} samples of {len(names)} classes ({', '.join(names)}), {size}x{size}; {report.summary}; "
        f"backend={backend!r}, device={device}")
    if device.type == "cuda":
        log(f"fp32 convolutions on CUDA use TF32: {torch.backends.cudnn.allow_tf32} "
            "(torch.backends.cudnn.allow_tf32, followed by eager and fused alike)")

    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc="over-fit", unit="step", disable=not progress)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=shuffle).to(device)
        for first in range(0, len(x), batch_size):
            index = order[first:first + batch_size]
            xb, yb = x[index], y[index]
            for name, model in models.items():
                optimizer = optimizers[name]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                schedules[name].step()
                losses[name].append(loss.item())
            bar.update(1)
            bar.set_postfix(eager=f"{losses['eager'][-1]:.4f}", fused=f"{losses['fused'][-1]:.4f}")
        done = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        gap = max(abs(a - b) for a, b in zip(losses["eager"][done], losses["fused"][done]))
        log(f"epoch {epoch + 1}/{epochs}: mean loss eager {np.mean(losses['eager'][done]):.6f}, "
            f"fused {np.mean(losses['fused'][done]):.6f}, max |gap| {gap:.3e}")
    bar.close()
    seconds = time.perf_counter() - start

    gaps = [abs(a - b) for a, b in zip(losses["eager"], losses["fused"])]
    result = {
        "eager_losses": losses["eager"],
        "fused_losses": losses["fused"],
        "max_abs_gap": max(gaps),
        "max_rel_gap": max(g / abs(a) for g, a in zip(gaps, losses["eager"])),
        "steps_per_epoch": steps_per_epoch,
        "classes": names,
        "samples": len(x),
        "fuse_report": report.summary,
        "seconds": seconds,
        "plot": None,
    }
    if out is not None:
        result["plot"] = plot_losses(
            losses["eager"], losses["fused"], out, steps_per_epoch,
            title=f"Xception over-fit, eager vs fused: {len(x)} crops of {len(names)} photographs, "
                  f"{size}x{size}\nbatch {batch_size}, Adam lr {lr:g} cosine-annealed, {device}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m xception_fast.overfit",
        description="Over-fit eager Xception and its fused copy on crops of scikit-image's photographs, "
                    "side by side from the same weights on the same batches; print and plot both loss curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="passes over the samples")
    parser.add_argument("--batch-size", type=int, default=10, help="samples per step (the last batch may be short)")
    parser.add_argument("--size", type=int, default=71, help="input height and width (at least 71)")
    parser.add_argument("--seed", type=int, default=0, help="draws the data, the weights and the batch order")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="auto", help="the fused op's backend, passed to fuse()")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam's initial learning rate, cosine-annealed to 0")
    parser.add_argument("--classes", type=int, default=10,
                        help=f"photographs used, one class each (at most {len(PHOTOGRAPHS)})")
    parser.add_argument("--samples-per-class", type=int, default=10, help="crops drawn from each photograph")
    parser.add_argument("--out", default="overfit.png", help="where the PNG plot of the loss curves goes")
    args = parser.parse_args(argv)
    result = run(epochs=args.epochs, batch_size=args.batch_size, size=args.size, seed=args.seed,
                 device=args.device, backend=args.backend, lr=args.lr, classes=args.classes,
                 samples_per_class=args.samples_per_class, out=args.out)
    print("step  loss_eager    loss_fused    |gap|")
    for step, (a, b) in enumerate(zip(result["eager_losses"], result["fused_losses"]), 1):
        print(f"{step:4d}  {a:.8f}  {b:.8f}  {abs(a - b):.3e}")
    last_epoch = slice(-result["steps_per_epoch"], None)
    print(f"final loss (last step): eager {result['eager_losses'][-1]:.6f}, fused {result['fused_losses'][-1]:.6f}; "
          f"mean over the last epoch: eager {np.mean(result['eager_losses'][last_epoch]):.6f}, "
          f"fused {np.mean(result['fused_losses'][last_epoch]):.6f}")
    print(f"max |loss_eager - loss_fused| over {len(result['eager_losses'])} steps: {result['max_abs_gap']:.3e} "
          f"(relative {result['max_rel_gap']:.3e})")
    print(f"trained both models in {result['seconds']:.1f} s; plot written to {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
