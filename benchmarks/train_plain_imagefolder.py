"""Train a torchvision model on an ImageFolder with plain torchvision code and save its state_dict: a user's checkpoint.

The stand-in for "my model", made without icnn-compress, for the README's plain-checkpoint commands
(``icnn analyze --model ARCH --checkpoint FILE --data DIR``, then ``icnn prune`` and ``icnn export``):

    python benchmarks/train_plain_imagefolder.py --data runs/data/fashion-folders/train --out runs/mnv2-if/mine.pth \
        --arch mobilenet_v2 --weights IMAGENET1K_V1 --image-size 128 --epochs 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models, transforms


def train(data: Path, out: Path, *, arch: str, weights: str | None, image_size: int, epochs: int, lr: float,
          seed: int) -> float:
    """Fine-tune ``arch`` on the class folders ``data`` (AdamW, ``epochs``), save its state_dict; return train accuracy."""
    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    folder = datasets.ImageFolder(str(data), transform=tf)
    model = models.get_model(arch, weights=weights)
    head = model.classifier[-1] if hasattr(model, "classifier") else model.fc
    new = nn.Linear(head.in_features, len(folder.classes))
    if hasattr(model, "classifier"):
        model.classifier[-1] = new
    else:
        model.fc = new
    loader = torch.utils.data.DataLoader(folder, batch_size=32, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    correct = total = 0
    for _ in range(epochs):
        correct = total = 0
        model.train()
        for images, labels in loader:
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return 100.0 * correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="class folders (ImageFolder layout)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    acc = train(args.data, args.out, arch=args.arch, weights=args.weights, image_size=args.image_size,
                epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"wrote {args.out} (train accuracy {acc:.1f}% in the last epoch)")


if __name__ == "__main__":
    main()
