"""The plain PyTorch/torchvision script the end-to-end benchmark runs against ``python -m train``.

What a user would write: ImageFolder, DataLoader, torchvision's resnet18, SGD with Nesterov momentum,
linear warm-up then cosine decay per step, weight decay on conv/linear weights only (the trainer's recipe),
RandomResizedCrop + flip for training, Resize + CenterCrop for validation, evaluated every epoch.
``python benchmarks/digits_torch.py DIR --epochs 20`` (DIR holds train/ and val/ class folders).
"""

import argparse
import json
import math

import torch
from torchvision import datasets, models
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    args = p.parse_args()
    size = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    val_tf = T.Compose([T.Resize(size * 256 // 224), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
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
    print(json.dumps({"val_top1": top1}))


if __name__ == "__main__":
    main()
