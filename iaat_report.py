"""The results of iaat_eval as people read them: the rows of paper Tables 1 and 3, the sanity
flags (signs of gradient masking or of an unconverged attack), and the sweeps of Figs 4 and 9
as tables and plots. Pure functions of a results dict (an eval.json), so they also run on
files written long ago:

    import json, iaat_report
    r = json.load(open("runs/digits-smallcnn-iaat-seed0/eval.json"))
    print(iaat_report.eval_table([r])); iaat_report.sanity_flags(r)
"""
from __future__ import annotations

from pathlib import Path

from iaat_autoattack import AUTOATTACK_PARTS
from iaat_plot import save_figure


def pgd_name(steps: int, restarts: int) -> str:
    """The name of a PGD attack in results and tables: PGD-<steps>x<restarts>."""
    return f"PGD-{steps}x{restarts}"


# ============================================================================================
# Tables: the rows of paper Tables 1 and 3, the notes under them, the sweeps
# ============================================================================================

# the columns of paper Tables 1 and 3 after natural and the white-box PGD rows: (key, title)
TABLE_COLUMNS = (("transfer", "transfer"), ("corruptions", "corruption"), ("deepfool", "DeepFool"),
                 ("mifgsm", "MI-FGSM"), ("cw40", "CW40"), ("apgd", "APGD-CE+T"),
                 ("autoattack", "AutoAttack"), ("worst_case", "worst case"))


def _stage_cells(r: dict, key: str, title: str) -> dict:
    """The robust accuracy after each stage but the last (the reference's report), then the part's
    own column. An autoattack result without details is torchattacks' weaker 10-iteration
    version, and its title says so."""
    if key == "autoattack" and f"{key}_details" not in r:
        return {"AutoAttack (torchattacks, 10 iterations)": r[key]}
    stages = list(r.get(f"{key}_stages", {}).items())[:-1]
    prefix = "AA after " if key == "autoattack" else ""
    return {**{prefix + t: v for t, v in stages}, title: r[key]}


def table_cells(r: dict) -> dict:
    """Column title -> accuracy in % of one evaluation result, in the order of Tables 1 and 3."""
    cells = {"natural": r["natural"], **r.get("whitebox", {})}
    for key, title in TABLE_COLUMNS:
        if key in AUTOATTACK_PARTS and key in r:
            cells.update(_stage_cells(r, key, title))
        elif key in r:
            cells[title] = r[key]["mean"] if isinstance(r[key], dict) else r[key]
    return {k: 100 * v for k, v in cells.items()}


def eval_table(rows: list) -> str:
    """Markdown: one row per evaluated run, the columns that ran, and the sanity flags raised."""
    titles = list(dict.fromkeys(t for r in rows for t in table_cells(r)))
    flags = any("flags" in r for r in rows)
    lines = ["| run | " + " | ".join(titles) + (" | flags |" if flags else " |"),
             "|" + " --- |" * (len(titles) + 1 + flags)]
    for r in rows:
        cells = table_cells(r)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{cells[t]:.2f}" if t in cells else "-" for t in titles) + " |" + (
            f" {', '.join(f['flag'] for f in r.get('flags', [])) or 'none'} |" if flags else ""))
    return "\n".join(lines)


def stage_notes(r: dict) -> str:
    """What the AutoAttack columns are, under the table."""
    out = []
    if "autoattack_details" in r:
        d = r["autoattack_details"]
        out.append(f"AutoAttack: standard version of the reference implementation "
                   f"({d['package']}), L-inf; 'AA after X' is its robust accuracy after its "
                   "attacks up to X, run in turn on the images still standing (APGD-CE, APGD-T, "
                   "FAB-T, Square); the AutoAttack column is after all four.")
    if "apgd_details" in r:
        out.append("APGD-CE+T: the first two attacks of standard AutoAttack only (a quick look, "
                   "not AutoAttack): APGD-CE then APGD-T, 100 iterations each.")
    return "\n".join(out)


# ============================================================================================
# RobustBench's model_info: the result in the format of a leaderboard submission
# ============================================================================================

# RobustBench's name of each network ("architecture"), and the paper of the method, where the
# method is the paper's own (the fields a submission cites; unknown for the baselines)
ARCHITECTURE_NAMES = {"resnet18": "PreActResNet-18", "wrn32-10": "WideResNet-34-10",
                      "smallcnn": "SmallCNN"}
PAPERS = {"iaat": {"link": "https://arxiv.org/abs/1910.08051",
                   "name": "Instance adaptive adversarial training: Improved accuracy tradeoffs "
                           "in neural nets",
                   "authors": "Yogesh Balaji, Tom Goldstein, Judy Hoffman",
                   "venue": "arXiv, Oct 2019"}}
TEST_SET_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "digits": 497}
METHOD_NAMES = {"iaat": "IAAT", "at": "PGD-AT (Madry et al.)", "trades": "TRADES (Zhang et al.)",
                "clean": "standard training"}


def method_name(method: str, loss: str = "ce", weights: str = "raw") -> str:
    """'IAAT', 'IAAT with the TRADES loss', 'TRADES (Zhang et al.), weight average', ..."""
    name = METHOD_NAMES[method] + (" with the TRADES loss" if method == "iaat" and
                                   loss == "trades" else "")
    return name + (", weight average" if weights == "ema" else "")


def robustbench_percent(acc: float) -> str:
    """An accuracy as RobustBench writes it into model_info (robustbench.utils.update_json)."""
    return str(round(acc * 100, 2))


def model_info(r: dict) -> dict:
    """RobustBench's model_info of an evaluation with the autoattack part (an eval.json), the
    fields of its model_info/<dataset>/Linf/*.json files in their order and formats:
    clean_acc and autoattack_acc as its update_json writes them, `reported` = autoattack_acc
    (the number this evaluation reports), eps as "8/255", the network's name, no additional
    data, one forward pass. The paper's link, title, authors and venue for IAAT runs, None
    for the baselines (the submitter's to fill); the footnote says which checkpoint was
    attacked and on how many test images. Nothing else: no number that was not measured."""
    if "autoattack_details" not in r:
        raise ValueError("model_info needs an evaluation with the autoattack part")
    d = r["autoattack_details"]
    full = TEST_SET_SIZES.get(r["dataset"])
    images = "the whole test set" if r["n_examples"] == full else \
        f"{r['n_examples']} of the {full or '?'} test images (seed {r['eval_seed']})"
    paper = PAPERS.get(r["method"], dict.fromkeys(("link", "name", "authors", "venue")))
    return {"link": paper["link"], "name": paper["name"], "authors": paper["authors"],
            "additional_data": False, "number_forward_passes": 1, "dataset": r["dataset"],
            "venue": paper["venue"], "architecture": ARCHITECTURE_NAMES[r["model"]],
            "eps": f"{r['eps_255']:g}/255", "clean_acc": robustbench_percent(r["natural"]),
            "reported": robustbench_percent(r["autoattack"]),
            "autoattack_acc": robustbench_percent(r["autoattack"]),
            "footnote": f"{method_name(r['method'], r.get('loss', 'ce'), r.get('weights', 'raw'))}"
                        " trained with the iaat reference "
                        f"implementation, {r['checkpoint']} checkpoint (epoch "
                        f"{r['checkpoint_epoch']} of {r['epochs']}); {d['version']} AutoAttack "
                        f"({d['package']}, {d['norm']}) on {images}."}


# ============================================================================================
# Sanity flags: signs of gradient masking or of an unconverged attack
# ============================================================================================

# What each flag means and what to try (Carlini et al. 2019, "On evaluating adversarial
# robustness"; Croce & Hein 2020, and the reference's own checks, flags_doc.md).
FLAGS = {
    "transfer_beats_whitebox": (
        "images crafted on another model fool this one more often than white-box PGD on this "
        "model itself: its gradients mislead the attack (gradient masking), so the white-box "
        "numbers overstate robustness",
        "trust the lower number; run autoattack (its Square stage needs no gradients); look for "
        "non-differentiable or saturating layers and attack through a smooth approximation (BPDA)"),
    "square_beats_gradient_attacks": (
        "Square, a black-box attack, breaks images that APGD-CE, APGD-T and FAB-T left standing: "
        "the gradient attacks are being misled (gradient masking)",
        "trust AutoAttack's final number, not the PGD ones; run Square with more queries and "
        "restarts, or an adaptive attack (Tramer et al. 2020)"),
    "eps_sweep_rises": (
        "accuracy rises as the test radius grows, although every image inside a small ball is "
        "also inside the larger one: the attack fails at large radii (masking, or a step size "
        "that does not fit the radius)",
        "check the sweep's step size, run more steps and restarts at the large radii"),
    "eps_sweep_does_not_fall": (
        "accuracy does not fall towards 0 as the test radius grows: at twice the evaluation "
        "radius an attack should break most images, and it breaks fewer than half of those the "
        "model classifies correctly (a sign of gradient masking)",
        "extend the sweep to larger radii; try a gradient-free attack (Square, in autoattack) "
        "or a transfer attack at the largest radius"),
    "autoattack_above_pgd": (
        "AutoAttack leaves more images standing than our PGD: the stronger attack should be at "
        "most PGD's accuracy; the model may be randomised, output probabilities instead of "
        "logits, or its loss surface may defeat APGD's step-size rule",
        "read the reference's warnings in the JSON (autoattack_details.warnings); for a "
        "randomised model use version='rand' (EOT); report the lower number"),
    "apgd_above_pgd": (
        "APGD-CE+T (the first two attacks of standard AutoAttack, not AutoAttack) leaves more "
        "images standing than our PGD: the model may be randomised, output probabilities "
        "instead of logits, or its loss surface may defeat APGD's step-size rule",
        "read the reference's warnings in the JSON (apgd_details.warnings); run the full "
        "autoattack part; report the lower number"),
    "attack_not_converged": (
        "a stronger setting of the same attack (tenfold the steps, or more restarts) still "
        "lowers accuracy a lot: the attack has not converged and the reported accuracy is an "
        "overestimate",
        "run more steps and restarts until accuracy stops falling (the steps sweep shows where); "
        "report the strongest result"),
    "autoattack_warning": (
        "the reference AutoAttack's own checks warned (its flags_doc.md): e.g. a randomised or "
        "dynamic model, outputs that look like probabilities, or inputs with zero gradient",
        "read the warning in the JSON (autoattack_details.warnings) and follow flags_doc.md of "
        "fra31/auto-attack"),
    "apgd_warning": (
        "the reference's own checks warned while running APGD-CE+T (its flags_doc.md): e.g. a "
        "randomised or dynamic model, outputs that look like probabilities, or inputs with "
        "zero gradient",
        "read the warning in the JSON (apgd_details.warnings) and follow flags_doc.md of "
        "fra31/auto-attack"),
}


def sanity_flags(r: dict) -> list:
    """The signs of gradient masking or of an unconverged attack in one evaluation result (a
    pure function of the results dict, as in eval.json). Each flag: {"flag", "evidence",
    "meaning", "try"}. Differences count only above the noise: max(2 images, 1 point).

    - transfer_beats_whitebox: transfer below the strongest white-box PGD (untargeted only);
    - square_beats_gradient_attacks: AutoAttack's Square stage lowers its accuracy further;
    - eps_sweep_rises: accuracy higher at a larger test radius;
    - eps_sweep_does_not_fall: at the largest radius (at least twice the evaluation radius)
      accuracy above half the natural accuracy;
    - autoattack_above_pgd, apgd_above_pgd: AutoAttack, or APGD-CE+T (its first two attacks
      only, never called AutoAttack), above the strongest white-box PGD;
    - attack_not_converged: among the PGD runs with at least a tenth of the most steps any ran
      (the last tenfold of the effort), one with at least as many steps and restarts as another
      below it by more than max(2 points, 10% of the weaker's accuracy); the steps sweep
      counts as PGD-k x 1;
    - autoattack_warning, apgd_warning: the reference's own checks warned in that part."""
    n = r.get("n_examples") or 0
    tol = max(2 / n if n else 0.0, 0.01)
    out = []

    def flag(name, evidence):
        out.append({"flag": name, "evidence": evidence, "meaning": FLAGS[name][0],
                    "try": FLAGS[name][1]})

    pct = lambda v: f"{100 * v:.2f}%"
    white = r.get("whitebox", {})
    strongest = min(white.items(), key=lambda kv: kv[1]) if white else None
    if strongest and "transfer" in r and r.get("targeted", "none") == "none" and \
            r["transfer"] < strongest[1] - tol:
        flag("transfer_beats_whitebox", f"transfer {pct(r['transfer'])} < {strongest[0]} "
             f"{pct(strongest[1])}")
    stages = r.get("autoattack_stages", {})
    if "Square" in stages and len(stages) > 1:
        before = list(stages.values())[-2]
        if stages["Square"] < before - tol:
            flag("square_beats_gradient_attacks", f"after FAB-T {pct(before)}, after Square "
                 f"{pct(stages['Square'])}")
    if "eps_sweep" in r:
        eps, acc = r["eps_sweep"]["eps_255"], r["eps_sweep"]["acc"]
        order = sorted(range(len(eps)), key=lambda i: eps[i])
        rises = [(eps[a], acc[a], eps[b], acc[b]) for a, b in zip(order, order[1:])
                 if acc[b] > acc[a] + tol]
        if rises:
            flag("eps_sweep_rises", "; ".join(f"{pct(p)} at {e:g}/255 -> {pct(q)} at {f:g}/255"
                                               for e, p, f, q in rises))
        top = order[-1] if order else None
        if top is not None and r.get("eps_255") and eps[top] >= 2 * r["eps_255"] and \
                acc[top] > 0.5 * r["natural"] + tol:
            flag("eps_sweep_does_not_fall", f"{pct(acc[top])} at {eps[top]:g}/255, natural "
                 f"{pct(r['natural'])}")
    if strongest:
        for key, title in (("autoattack", "AutoAttack"), ("apgd", "APGD-CE+T")):
            if key in r and f"{key}_details" in r and r[key] > strongest[1] + tol:
                flag(f"{key}_above_pgd", f"{title} {pct(r[key])} > {strongest[0]} "
                     f"{pct(strongest[1])}")
    runs = [(_pgd_counts(k), v) for k, v in white.items()]
    if "steps_sweep" in r:
        runs += [((s, 1), v) for s, v in zip(r["steps_sweep"]["steps"], r["steps_sweep"]["acc"])]
    worst_gap, most_steps = None, max((k for (k, _), _ in runs), default=0)
    for (ks, rs), weak in runs:
        for (kb, rb), strong in runs:
            if kb >= ks and rb >= rs and (kb, rb) != (ks, rs) and 10 * ks >= most_steps and \
                    weak - strong > max(0.02, tol, 0.1 * weak) and \
                    (worst_gap is None or weak - strong > worst_gap[0]):
                worst_gap = (weak - strong, f"{pgd_name(ks, rs)} {pct(weak)} -> {pgd_name(kb, rb)} "
                             f"{pct(strong)}")
    if worst_gap:
        flag("attack_not_converged", worst_gap[1])
    for key in AUTOATTACK_PARTS:
        if r.get(f"{key}_details", {}).get("warnings"):
            flag(f"{key}_warning", "; ".join(r[f"{key}_details"]["warnings"]))
    return out


def _pgd_counts(name: str) -> tuple:
    """'PGD-100x5' -> (100, 5)."""
    steps, restarts = name.removeprefix("PGD-").split("x")
    return int(steps), int(restarts)


def flag_notes(r: dict) -> str:
    """The sanity flags in words, under the table."""
    flags = r.get("flags", [])
    if not flags:
        return "Sanity flags: none raised." if "flags" in r else ""
    return "Sanity flags (signs of gradient masking or an unconverged attack):\n" + "\n".join(
        f"- {f['flag']}: {f['evidence']}. Means: {f['meaning']}. Try: {f['try']}." for f in flags)


def sweep_tables(r: dict) -> str:
    out = []
    if "eps_sweep" in r:
        s = r["eps_sweep"]
        out += [f"\nTest-eps sweep ({s['attack']}, paper Fig 4):\n",
                "| eps (/255) | " + " | ".join(f"{e:g}" for e in s["eps_255"]) + " |",
                "|" + " --- |" * (len(s["acc"]) + 1),
                "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in s["acc"]) + " |"]
    if "steps_sweep" in r:
        s = r["steps_sweep"]
        out += [f"\nPGD-iteration sweep at {r['eps_255']:g}/255 (paper Fig 9):\n",
                "| PGD steps | " + " | ".join(map(str, s["steps"])) + " |",
                "|" + " --- |" * (len(s["acc"]) + 1),
                "| accuracy (%) | " + " | ".join(f"{100 * a:.2f}" for a in s["acc"]) + " |"]
    return "\n".join(out)


def plot_sweeps(r: dict, out: Path, stem: str) -> list:
    """<stem>_eps_sweep.png (Fig 4) and <stem>_steps_sweep.png (Fig 9); returns the paths."""
    from matplotlib.figure import Figure
    written = []
    for key, xkey, xlabel, title, log_x in (
            ("eps_sweep", "eps_255", "test eps (x/255)", "robust accuracy over test eps (Fig 4)",
             False),
            ("steps_sweep", "steps", "PGD steps", "robust accuracy over PGD steps (Fig 9)", True)):
        if key not in r:
            continue
        fig = Figure(figsize=(5, 3.4), layout="constrained")
        ax = fig.subplots()
        ax.plot(r[key][xkey], [100 * a for a in r[key]["acc"]], marker="o", label=r["label"])
        ax.set(xlabel=xlabel, ylabel="accuracy (%)", title=title, ylim=(0, 100))
        if log_x:
            ax.set_xscale("log")
        ax.legend()
        path = out / f"{stem}_{key}.png"
        save_figure(fig, path)
        written.append(path)
    return written
