"""Training throughput of imagenet/train.py's step on one device: images per second of a
torchvision ResNet trained with PGD-30 attacks (Table 11) on synthetic 224x224 data, for each
precision in one run (fp16 against fp32).

    python benchmarks/imagenet_throughput.py --device cuda            # ResNet-50, fp16 and fp32
    python benchmarks/imagenet_throughput.py --device cuda --arch resnet152 --batch 32
    python benchmarks/imagenet_throughput.py --quick                  # CPU smoke test, ~20 s

It times `iaat.train_step` with the launcher's own iaat.Config (algorithm_config), so the
figure is the launcher's, data loading aside: --method at is PGD-AT with PGD-30; --method
iaat is IAAT after warmup (a clean forward, Alg 2 with PGD-10 and early exit, PGD-30). The
precisions are interleaved step by step and the median step time is reported. Results: a
markdown table on stdout and JSON in benchmarks/results/ (--json to choose).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import iaat  # noqa: E402
import iaat_run  # noqa: E402


def launcher():
    """imagenet/train.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("imagenet_train", ROOT / "imagenet" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--method", default="at", choices=("at", "iaat"))
    p.add_argument("--batch", type=int, default=32, help="images per step (Table 11: 32 per GPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--amp", nargs="+", default=["fp16", "none"], choices=tuple(iaat.AMP))
    p.add_argument("--attack-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="timed steps per precision")
    p.add_argument("--warm", type=int, default=3, help="untimed steps per precision first")
    p.add_argument("--device", default="auto")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true",
                   help="resnet18, 32x32, batch 2, 2 attack steps, 1 timed step (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.image_size, args.batch, args.classes = "resnet18", 32, 2, 10
        args.attack_steps, args.steps, args.warm = 2, 1, 1
    if min(args.batch, args.steps, args.attack_steps, args.image_size) < 1:
        p.error("--batch, --steps, --attack-steps and --image-size must be positive")
    return args


def contender(m, args, amp: str, device):
    """A model, optimiser and iaat.Config for one precision, from the same seed."""
    c = m.imagenet_config(data="synthetic", model=args.arch, method=args.method, amp=amp,
                          attack_steps=args.attack_steps, channels_last=args.channels_last,
                          select_steps=min(10, args.attack_steps), warmup=0)
    cfg = m.algorithm_config(c, world=1)
    torch.manual_seed(0)
    model = m.build_model(args.arch, args.classes).to(device)
    s = iaat.make_state(model, cfg, args.batch)  # the eps memory at eps_w = 16/255
    s.epoch = 1  # past the warmup (0): Alg 2 selects
    layout = torch.channels_last if iaat.uses_channels_last(cfg, device) else torch.contiguous_format
    return {"cfg": cfg, "state": s, "layout": layout}


def step(k, x, y, idx, device) -> float:
    """Seconds of one training step (attacks included), synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    iaat.train_step(k["state"], x.contiguous(memory_format=k["layout"]), y, idx, k["cfg"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = iaat_run.pick_device(args.device)
    m = launcher()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    idx = torch.arange(args.batch, device=device)
    runs = {amp: contender(m, args, amp, device) for amp in args.amp}
    times = {amp: [] for amp in args.amp}
    for i in range(args.warm + args.steps):  # interleaved: fp16, fp32, fp16, fp32, ...
        for amp in args.amp:
            seconds = step(runs[amp], x, y, idx, device)
            if i >= args.warm:
                times[amp].append(seconds)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"command": "python " + shlex.join(["benchmarks/imagenet_throughput.py",
                                                 *(sys.argv[1:] if argv is None else argv)]),
              "hardware": hardware, "torch": torch.__version__, "arch": args.arch,
              "method": args.method, "batch": args.batch, "image_size": args.image_size,
              "attack_steps": args.attack_steps, "timed_steps": args.steps,
              "images_per_second": {}, "median_step_seconds": {}}
    print(f"{args.arch}, {args.method} with PGD-{args.attack_steps}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, {hardware}, torch {torch.__version__}\n")
    print("| precision | median step (s) | images/s |\n| --- | --- | --- |")
    for amp in args.amp:
        median = statistics.median(times[amp])
        result["median_step_seconds"][amp] = median
        result["images_per_second"][amp] = args.batch / median
        print(f"| {amp if amp != 'none' else 'fp32'} | {median:.3f} | {args.batch / median:.1f} |")
    if "fp16" in times and "none" in times:
        speedup = statistics.median(a / b for a, b in zip(times["none"], times["fp16"]))
        result["fp16_speedup_over_fp32"] = speedup
        print(f"\nfp16 is {speedup:.2f}x as fast as fp32 (median of per-step ratios)")
    path = Path(args.json or ROOT / "benchmarks" / "results" /
                f"imagenet-{device.type}-{args.arch}-{args.method}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
