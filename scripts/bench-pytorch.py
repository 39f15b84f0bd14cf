#!/usr/bin/env python3
"""PyTorch's own training step, for the comparison in docs/step-speed.md.

The baseline users hold aq against: a plain PyTorch script training the same
architecture on one synthetic batch as `aq-bench step` does (SGD lr 0.01
momentum 0.9 with PyTorch's default multi-tensor update, cuDNN autotuning,
channels_last, optional bf16 autocast, cross-entropy in fp32), eagerly and
captured whole as a CUDA graph (torch.cuda.graph).  Prints one TSV line per
mode with the median step time over --steps synchronised steps.

  python3 scripts/bench-pytorch.py --arch resnet50 -b 256 --amp bf16
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """torchvision's resnet50 (stride on the 3x3 convolution)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        s = x if self.short is None else self.short(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + s


class PreActResNet(nn.Module):
    """ActNN's CIFAR PreAct-ResNet (6n+2 layers)."""

    def __init__(self, depth, channels, classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        o = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


def build(arch, channels, classes):
    if arch == "resnet50":
        return ResNet50(channels, classes)
    if arch.startswith("preact_resnet"):
        return PreActResNet(int(arch[len("preact_resnet"):]), channels, classes)
    sys.exit(f"bench-pytorch.py: unknown --arch {arch}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", metavar="FILE",
                   help="also write the eager step's 40 largest device kernels (TSV: name, calls and ms per step)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench-pytorch.py: needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    print("device\tarch\tbatch\timage\tamp\tmode\tmedian_ms\timg_per_s")
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        model = build(a.arch, a.channels, a.classes).to(dev).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(a.batch_size, a.channels, a.image_size, a.image_size, device=dev).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(a.classes, (a.batch_size,), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.amp == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            opt.step()
            return loss

        run = step
        if mode == "graph":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(g):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.amp == "bf16", cache_enabled=False):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                loss.backward()
                opt.step()
            run = g.replay
        for _ in range(a.warmup):
            run()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        if a.profile and mode == "eager":
            steps = 3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    run()
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():
                t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                if t > 0:
                    kernels[e.key] = (e.count, t)
            with open(a.profile, "w") as f:
                f.write("name\tcalls_per_step\tms_per_step\n")
                for name, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:40]:
                    f.write(f"{name}\t{c / steps:.1f}\t{t / steps / 1e3:.3f}\n")
        print(f"cuda\t{a.arch}\t{a.batch_size}\t{a.image_size}\t{a.amp}\t{mode}\t{ms:.2f}\t{a.batch_size / ms * 1e3:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
