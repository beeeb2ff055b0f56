"""How loose is iaat_radius.minimal_radius? Its answer is an upper bound on each image's minimal
adversarial L-inf radius: the smallest radius at which its PGD found an image of another class.
A much stronger attack finds such images at smaller radii, so the drop from the default attack
(PGD-20, 3 random starts) to a much stronger one measures how loose the default is, at least;
what the strongest attack still misses stays unmeasured.

    python scripts/radius_bound.py runs/digits-iaat-seed0                # 400 training images
    python scripts/radius_bound.py RUN --n 400 --attacks 20x3,100x3,100x10 --seed 0

Prints a markdown table: per attack, the median radius and, against the first attack, the shares
of images whose bound dropped, or rose, by more than the bisection's tolerance (random starts
differ, so a stronger attack need not fool every image the weaker one fooled), and the median
and 90th percentile of the drop (x/255). Bisection on [0, 2.5 eps_w] down to beta * gamma, the settings
of notebook 03.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import iaat  # noqa: E402
import iaat_eval  # noqa: E402
import iaat_radius  # noqa: E402
import iaat_run  # noqa: E402


def measure(model, x, y, attacks, *, eps_max: float, tol: float, seed: int = 0) -> list:
    """One row per attack: its radii (x/255; inf where never fooled up to eps_max) and seconds."""
    rows = []
    for steps, restarts in attacks:
        torch.manual_seed(seed)
        t0 = time.time()
        r = iaat_radius.minimal_radius(model, x, y, eps_max=eps_max, tol=tol, steps=steps,
                                       restarts=restarts).double().numpy() * iaat.PIXEL
        rows.append({"attack": f"PGD-{steps}x{restarts}", "radius": r,
                     "seconds": time.time() - t0})
    return rows


def table(rows, tol_255: float) -> str:
    base = rows[0]["radius"]
    lines = ["| attack | median radius (/255) | never fooled | bound lower than with "
             f"{rows[0]['attack']} by > tol | higher by > tol | median drop (/255) | "
             "90th pct drop (/255) | seconds |", "|" + " --- |" * 8]
    for row in rows:
        r = row["radius"]
        both = np.isfinite(base) & np.isfinite(r)
        drop = np.zeros_like(r)
        drop[both] = base[both] - r[both]  # where either is inf (never fooled), no drop
        lines.append(f"| {row['attack']} | {np.median(r):.1f} | {int(np.isinf(r).sum())} | "
                     f"{(drop > tol_255).mean():.1%} | {(drop < -tol_255).mean():.1%} | "
                     f"{np.median(drop):.2f} | "
                     f"{np.percentile(drop, 90):.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder trained by iaat.py")
    p.add_argument("--n", type=int, default=400, help="training images, drawn with --seed")
    p.add_argument("--attacks", type=iaat_run.parse_pairs, default=((20, 3), (100, 3), (100, 10)),
                   help="PGD attacks of the bisection, the first the default (20x3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model, cfg, data, _ = iaat_eval.load_run(args.run)
    except (iaat_run.IAATError, OSError) as err:
        print(f"radius_bound: error: {err}", file=sys.stderr)
        return 1
    x, y = iaat.to_float(data.train_x), data.train_y
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    pick = pick.sort().values
    eps_max, tol = 2.5 * cfg.eps_w, cfg.beta * cfg.gamma
    rows = measure(model, x[pick], y[pick], args.attacks, eps_max=eps_max, tol=tol,
                   seed=args.seed)
    print(f"{args.run}: {len(pick)} training images (seed {args.seed}), bisection on "
          f"[0, {eps_max * iaat.PIXEL:g}/255] to {tol * iaat.PIXEL:g}/255, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(table(rows, tol * iaat.PIXEL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
