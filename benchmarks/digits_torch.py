"""The plain PyTorch/torchvision script the end-to-end benchmark runs against ``python -m train``.

What a user would write: ImageFolder, DataLoader, torchvision's resnet18, SGD with Nesterov momentum,
linear warm-up then cosine decay per step, weight decay on conv/linear weights only (the trainer's recipe),
RandomResizedCrop + flip for training, Resize + CenterCrop for validation, evaluated every epoch.
``python benchmarks/digits_torch.py DIR --epochs 20`` (DIR holds train/ and val/ class folders).

``--in-memory`` is the other script a user writes for a small dataset: every image decoded once into one uint8
tensor, the same transforms applied to tensors in the training process, no loader workers (which on a small
machine compete with torch's own threads for the cores).

``--checkpoint-dir DIR`` saves a checkpoint after every epoch, as torchvision's reference script does (model,
optimizer, scheduler and epoch, with ``torch.save``), keeping the last three as ``python -m train`` does.
"""

import argparse
import json
import math
import os

import torch
from torchvision import datasets, models
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Batches:
    """Batches of (images, labels) drawn from uint8 tensors each epoch, per-image ``transform`` applied (if any)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform=None,
                 shuffle: bool = False, drop_last: bool = False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.transform, self.shuffle, self.drop_last = transform, shuffle, drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.labels)) if self.shuffle else torch.arange(len(self.labels))
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[index]
            if self.transform is not None:
                x = torch.stack([self.transform(img) for img in x])
            yield (x.float() / 255.0 - mean) / std, self.labels[index]


def in_memory(root: str, batch_size: int, size: int):
    """(train set, its batches, val set, its batches) decoded once into uint8 tensors; val pre-transformed."""
    from torchvision.transforms import v2

    def load(split: str, transform=None):
        folder = datasets.ImageFolder(f"{root}/{split}")
        images = [v2.functional.pil_to_tensor(folder.loader(path)) for path, _ in folder.samples]
        if transform is not None:
            images = [transform(img) for img in images]
        return folder, torch.stack(images), torch.tensor(folder.targets)

    train, train_x, train_y = load("train")
    val, val_x, val_y = load("val", v2.Compose([v2.Resize(size * 256 // 224), v2.CenterCrop(size)]))
    augment = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()])
    return (train, Batches(train_x, train_y, batch_size, augment, shuffle=True, drop_last=True),
            val, Batches(val_x, val_y, batch_size))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--in-memory", action="store_true", help="decode once, transform tensors, no loader workers")
    p.add_argument("--checkpoint-dir", help="save a checkpoint here after every epoch, keeping the last three")
    args = p.parse_args()
    size = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    val_tf = T.Compose([T.Resize(size * 256 // 224), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    if args.in_memory:
        train, loader, val, val_loader = in_memory(args.data, args.batch_size, size)
    else:
        train = datasets.ImageFolder(f"{args.data}/train", train_tf)
        val = datasets.ImageFolder(f"{args.data}/val", val_tf)
        loader = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
        val_loader = torch.utils.data.DataLoader(val, args.batch_size, num_workers=args.num_workers,
                                                 persistent_workers=args.num_workers > 0)
    torch.manual_seed(0)
    model = models.resnet18(num_classes=len(train.classes))
    decay = [q for q in model.parameters() if q.ndim > 1]
    rest = [q for q in model.parameters() if q.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    total, warm = args.epochs * len(loader), args.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1))))
    loss_fn = torch.nn.CrossEntropyLoss()
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        top1 = 100.0 * correct / len(val)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f} val top-1 {top1:.2f}%", flush=True)
        if args.checkpoint_dir:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                        "epoch": epoch}, os.path.join(args.checkpoint_dir, f"checkpoint_{epoch}.pth"))
            old = os.path.join(args.checkpoint_dir, f"checkpoint_{epoch - 3}.pth")
            if os.path.exists(old):
                os.remove(old)
    print(json.dumps({"val_top1": top1}))


if __name__ == "__main__":
    main()
