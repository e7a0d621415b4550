"""Inference with an onboarded site's saved model, no Flower involved:

    python -m fedcoe_flwr.predict --model <state-dir>/<run>/<site>.onboarded.pt --images /data/new-site/test

Reads every image under ``--images`` (recursively; png/jpg/...), resizes it as the federation's
training data was, and prints one line per image: path, predicted class, its probability.
``--out predictions.csv`` also writes them as CSV. When the images sit in class folders named
after the federation's classes (``<class>/*.png``), it also prints the accuracy on them.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from .bundle import load_bundle, predict_images
from .client.onboarding import read_unlabeled_images


def predict_folder(model: str | Path, images: str | Path, device: str = "cpu"
                   ) -> tuple[list[tuple[str, str, float]], float | None, dict]:
    """([(path, class, probability)], accuracy on images in known class folders or None, bundle)."""
    bundle = load_bundle(model)
    names = list(bundle["class_names"])
    x, files = read_unlabeled_images(images, int(bundle["config"]["image_size"]))
    probs = predict_images(bundle, x, torch.device(device))
    conf, pred = probs.max(1)
    rows = [(str(f), names[int(p)], float(c)) for f, p, c in zip(files, pred, conf)]
    labels = [f.parent.name for f in files]
    acc = None
    if all(label in names for label in labels):
        acc = sum(label == cls for label, (_, cls, _) in zip(labels, rows)) / len(rows)
    return rows, acc, bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model file an onboarded node saved")
    parser.add_argument("--images", required=True, help="a folder of images (or one image)")
    parser.add_argument("--out", default=None, help="also write path,class,probability to this CSV")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    try:
        rows, acc, bundle = predict_folder(args.model, args.images, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, cls, p in rows:
        print(f"{path}\t{cls}\t{p:.4f}")
    print(f"# {len(rows)} image(s); model {args.model} ({bundle['algorithm']}, run {bundle.get('run_name')}, "
          f"round {bundle.get('package_round')}, experts {bundle.get('expert_ids', 'n/a')})", file=sys.stderr)
    if acc is not None:
        print(f"# accuracy on images in class folders: {acc:.4f}", file=sys.stderr)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "class", "probability"])
            writer.writerows(rows)
        print(f"# predictions written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
