"""The run machinery behind iaat.py, which nothing of the algorithm depends on:

- torchrun's process group: join it, leave it together, this process's rank, collectives,
  and the process's exit;
- the run folder's files: writes that survive a kill at any moment, the lock that keeps two
  trainings out of one folder, the metrics and eps-history files, checkpoints read back
  (weights_only) and checked, what a resume needs saved and restored, the best checkpoint;
- the SIGTERM flag the training loop polls, and the exit after it;
- how many CPU threads torch uses (the cores idle at the start);
- the command lines' parsing: one-line errors, flags from a config dataclass, and the value
  types of `iaat eval` (STEPSxRESTARTS lists, number lists).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist


class IAATError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class CLIParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        self.exit(2, f"iaat: error: {message} (see --help)\n")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, presets: dict, show: Callable, *,
                        skip=(), choices=None, aliases=None) -> None:
    """One flag per field of the dataclass `cls` (metadata: "help", and "unit" for fields typed
    in the CLI's units), its help ending with the unit, the default and each preset's value, as
    `show(name, value, unit)` writes them; a flag not given stays None (the preset decides)."""
    choices, aliases = choices or {}, aliases or {}
    for f in (f for f in dataclasses.fields(cls) if f.name not in skip):
        unit = f.metadata["unit"]
        per = ", ".join(f"{k} {show(f.name, q[f.name], bool(unit))}" for k, q in presets.items()
                        if f.name in q)
        kw = dict(dest=f.name, default=None, help=f"{f.metadata['help']} [{'x/255; ' if unit else ''}"
                  f"default: {show(f.name, f.default, bool(unit))}{'; presets: ' + per if per else ''}]")
        names = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        if f.type == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif "tuple" in f.type:
            p.add_argument(*names, type=float if unit else int, nargs="*",
                           metavar="EPS" if unit else "EPOCH", **kw)
        else:
            p.add_argument(*names, type=int if "int" in f.type else float if "float" in f.type
                           else str, choices=choices.get(f.name), **kw)


def dataclass_values(args: argparse.Namespace, cls, scale: float) -> dict:
    """The flags as field values: fields with a unit divided by `scale`, lists as tuples, None
    where a flag was not given."""
    values = {}
    for name, value in vars(args).items():
        value = tuple(value) if isinstance(value, list) else value
        if value is not None and cls.__dataclass_fields__[name].metadata["unit"]:
            value = tuple(v / scale for v in value) if isinstance(value, tuple) else value / scale
        values[name] = value
    return values


def parse_pairs(text: str) -> tuple:
    """'10x5,100x5' -> ((10, 5), (100, 5))."""
    try:
        pairs = tuple(tuple(int(v) for v in p.split("x")) for p in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected STEPSxRESTARTS[,...] such as 10x5, got {text!r}")
    return pairs


def parse_pair(text: str) -> tuple:
    """'1000x2' -> (1000, 2)."""
    pairs = parse_pairs(text)
    if len(pairs) != 1:
        raise argparse.ArgumentTypeError(f"expected one STEPSxRESTARTS such as 1000x2, got {text!r}")
    return pairs[0]


def numbers(kind, least: float = 0, single: bool = False):
    """A parser of 'a,b,c' (or of one number with `single`), each finite and >= least."""
    def parse(text: str):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or (single and len(values) > 1) or \
                any(not math.isfinite(v) or v < least for v in values):
            many = "a number" if single else "comma-separated numbers"
            raise argparse.ArgumentTypeError(f"expected {many} >= {least:g}, got {text!r}")
        return values[0] if single else values
    return parse


# ===== torchrun's process group ==============================================================

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:  # rank 0 alone logs and writes files
        return self.rank == 0


def current_dist() -> Dist:
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_with_others() -> bool:
    """Whether torchrun started this process with others (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """auto: this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if local_rank is None:  # torchrun's, when it started more than one process
        local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched_with_others() else 0
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise IAATError("--device cuda was asked for, but no CUDA device is available")
    if name == "cuda" and local_rank >= torch.cuda.device_count():
        raise IAATError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                        "run one process per GPU")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def init_distributed(device: torch.device) -> bool:
    """Join the process group when torchrun started us with more than one process (it sets
    RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables): nccl for a GPU `device` (this
    process's), gloo for the CPU. Returns whether it joined."""
    if not launched_with_others() or tdist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After a restart (--max-restarts) torchrun's store still holds the addresses of the
        # dead attempt's processes, and gloo would connect to those; key this attempt apart.
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False)
        tdist.init_process_group(backend, store=tdist.PrefixStore(f"iaat/attempt{attempt}", base),
                                 rank=rank, world_size=world)
    else:
        tdist.init_process_group(backend)
    return True


@contextmanager
def local_rank_zero_first():
    """Run a block on each machine's local rank 0 first, then on its other processes (say, a
    download that the others then read)."""
    d = current_dist()
    if d.local_rank > 0:
        tdist.barrier()
    try:
        yield
    finally:  # also when it failed: the others then fail on their own instead of waiting
        if d.world > 1 and d.local_rank == 0:
            tdist.barrier()


@contextmanager
def process_group(device: torch.device):
    """Run a block in torchrun's process group (if torchrun started more than one process).
    When the block ends normally, every process waits for the others before any tears the
    group down: a process that left while another still used gloo died with SIGABRT
    ("terminate called without an active exception")."""
    joined = init_distributed(device)
    try:
        yield
        if joined:
            tdist.barrier()
            _all_past_the_barrier()
    finally:
        if joined:
            tdist.destroy_process_group()


def exit_process(code: int):
    """End the process with `code` (a script's last call). A process that torchrun started
    with others ends with os._exit once stdout and stderr are flushed, skipping the
    interpreter's finalization: DistributedDataParallel keeps gloo's process group and its
    threads alive past destroy_process_group, and a process whose C++ threads still ran while
    the interpreter tore itself down could abort after a run that succeeded (SIGABRT,
    "terminate called without an active exception"). Every file is closed by then."""
    if launched_with_others():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _all_past_the_barrier(timeout: float = 60.0) -> None:
    """Wait, on the rendezvous store rather than on gloo, until every process has returned
    from the last barrier. A process returns from gloo's barrier as soon as its own part is
    done, and one that then closed its connections could still kill a peer reading the
    barrier's last message."""
    store, world = tdist.distributed_c10d._get_default_store(), tdist.get_world_size()
    store.add("iaat/past_the_last_barrier", 1)
    deadline = time.time() + timeout  # a peer that died after the barrier must not hang us
    while store.add("iaat/past_the_last_barrier", 0) < world and time.time() < deadline:
        time.sleep(0.01)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); a no-op in a single process."""
    if current_dist().world > 1:
        tdist.all_reduce(t)
    return t


def any_process(flag: bool, device) -> bool:
    """True on every process if it is true on one (all processes stop at the same step)."""
    if current_dist().world == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)) > 0)


def gather_everywhere(value) -> list:
    """Every process's `value` (a small picklable object), in rank order, on every process."""
    everyone = [value] * current_dist().world
    if len(everyone) > 1:
        tdist.all_gather_object(everyone, value)
    return everyone


def global_totals(sums: dict) -> dict:
    """Running sums (tensors) summed over all processes, as floats (one all-reduce)."""
    keys = sorted(sums)
    return dict(zip(keys, all_sum(torch.stack([sums[k].double() for k in keys])).tolist()))


def same_everywhere(value, what: str) -> list:
    """Every process's `value`; IAATError on every process if they differ (e.g. where each one
    resumes: the run folder must be on a filesystem all of them share)."""
    everyone = gather_everywhere(value)
    if any(v != everyone[0] for v in everyone):
        raise IAATError(f"the processes disagree on {what}: {everyone}; is --out on a "
                        "filesystem all of them share?")
    return everyone


def agreement(groups: dict) -> tuple:
    """SHA-1 of each named group of tensors on every process (e.g. the eps memories, the
    models); IAATError if the processes' hashes of a group differ."""
    import hashlib
    found = []
    for name, tensors in groups.items():
        h = hashlib.sha1()
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        found.append(gather_everywhere(h.hexdigest()))
        if len(set(found[-1])) > 1:
            raise IAATError(f"the {name} of the {len(found[-1])} processes differ: {found[-1]}")
    return tuple(found)


# ===== The run folder's files ================================================================


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`: a kill at
    any moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def claim_run_dir(out: Path, device) -> Optional[object]:
    """Rank 0 creates the run folder and locks it (two copies of one command must not train
    into one folder), and removes temporary files a killed writer left; it returns the lock,
    the other processes None. Every process raises if rank 0 could not (BlockingIOError if
    another process holds the lock), so none goes on alone."""
    lock = problem = None
    if current_dist().main:
        try:
            lock = _lock_folder(out)
        except OSError as err:  # another process holds the lock, no permission, ...
            problem = err
    if any_process(problem is not None, device):
        raise problem or OSError(f"rank 0 could not claim {out}")
    return lock


def _lock_folder(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): run unlocked
        pass
    except OSError:
        lock.close()
        raise BlockingIOError(f"another process is training in {out}; wait for it or stop "
                              "it") from None
    for stale in out.glob(".*.tmp*"):
        stale.unlink()
    return lock


def read_metrics(path: Path, upto_epoch: int) -> list:
    """The metrics lines of epochs <= upto_epoch (a resumed run drops lines written later)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["epoch"] <= upto_epoch]


def write_metrics(path: Path, rows: list) -> None:
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def write_eps_history(path: Path, history: np.ndarray) -> None:
    """(epochs, n_train): the eps memory after each epoch, row e = after epoch e+1."""
    def save(p):
        with open(p, "wb") as f:  # a file, as np.save would add .npy to the temporary name
            np.save(f, history)
    atomic_write(path, save)


def config_dict(cfg) -> dict:
    """A config dataclass as JSON values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def changed_setting(cfg, saved: dict) -> Optional[str]:
    """The first setting (not a runtime one) in which `cfg` differs from a saved config, or
    None; a setting saved before it existed counts as its default."""
    mine, fields = config_dict(cfg), type(cfg).__dataclass_fields__
    return next((k for k in mine if k not in cfg.RUNTIME and
                 mine[k] != saved.get(k, fields[k].default)), None)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint read with weights_only=True and checked field by field; IAATError if not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding arbitrary objects
        raise IAATError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    fields = {"config": dict, "device": str, "epoch": int, "step": int, "totals": dict,
              "model": dict, "optimizer": dict, "scheduler": dict, "eps_memory": torch.Tensor,
              "eps_visits": torch.Tensor, "rng": dict}
    bad = [k for k, kind in fields.items() if not isinstance(ckpt.get(k), kind)] \
        if isinstance(ckpt, dict) else ["all"]
    if bad or ckpt.get("format") != 1:
        raise IAATError(f"checkpoint {path} is not a complete iaat checkpoint (missing "
                        f"{', '.join(bad) or 'format 1'})")
    return ckpt


# ===== Checkpoints: all a resume needs, written, read back and restored ====================

OUTPUTS = ("checkpoint.pt", "best.pt", "metrics.jsonl", "eps_history.npy", "summary.json",
           "config.json")


def save_checkpoint(path: Path, cfg, s, totals: dict,
                    gen: Optional[torch.Generator] = None) -> None:
    """All a resume needs: the state, the epoch's running totals, the number of processes,
    and the RNGs (CPU, this process's GPU, and mid-epoch the data generator `gen`)."""
    device = s.mem.device
    rng = {"torch": torch.get_rng_state(), "data": gen.get_state() if gen is not None else None,
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    ckpt = {"format": 1, "config": config_dict(cfg), "device": device.type,
            "processes": current_dist().world, "epoch": s.epoch, "step": s.step,
            "totals": {k: float(v) for k, v in totals.items()}, "model": s.model.state_dict(),
            "optimizer": s.opt.state_dict(), "scheduler": s.sched.state_dict(),
            "scaler": s.scaler.state_dict(), "eps_memory": s.mem.cpu(),
            "eps_visits": s.visits.cpu(), "rng": {k: v for k, v in rng.items() if v is not None}}
    if s.ema is not None:  # --ema: the averaged weights, and how many updates they hold
        ckpt.update(ema=s.ema.module.state_dict(), ema_updates=int(s.ema.n_averaged))
    atomic_write(path, lambda p: torch.save(ckpt, p))


def open_run(out: Path, cfg) -> Optional[dict]:
    """The run folder's checkpoint, checked against `cfg`, or None for a fresh run; IAATError
    on a corrupt or mismatched file, or on a fresh run into another run's outputs."""
    path = out / "checkpoint.pt"
    found = [name for name in OUTPUTS if (out / name).exists()]
    if not path.exists() and found:  # say, after its checkpoint was moved away
        raise IAATError(f"{out} holds {found[0]} but no checkpoint; move the whole folder away "
                        "or choose another --out")
    if not path.exists():
        return None
    try:
        ckpt = read_checkpoint(path)
    except IAATError as err:
        raise IAATError(f"{err}; move the run folder away to start afresh") from None
    k = changed_setting(cfg, ckpt["config"])
    if k is not None:
        raise IAATError(f"checkpoint {path} was written with {k}={ckpt['config'].get(k)!r}, this "
                        f"run has {k}={config_dict(cfg)[k]!r}; rerun with the same settings or "
                        "choose another --out")
    return ckpt


def restore(ckpt: dict, path: Path, s, data_state: bool = True) -> dict:
    """Load a checked checkpoint into the state; returns the epoch's running totals.
    `data_state`: a mid-epoch checkpoint must hold the data generator's state."""
    try:
        s.model.load_state_dict(ckpt["model"])
        s.opt.load_state_dict(ckpt["optimizer"])
        s.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            s.scaler.load_state_dict(ckpt["scaler"])
        if ckpt["eps_memory"].shape != s.mem.shape:
            raise ValueError(f"eps memory of {len(ckpt['eps_memory'])} samples, data has "
                             f"{len(s.mem)}")
        if ckpt["step"] and data_state and "data" not in ckpt["rng"]:
            raise KeyError("the mid-epoch data generator state is missing")
        if s.ema is not None:
            s.ema.module.load_state_dict(ckpt["ema"])
            s.ema.n_averaged.fill_(ckpt["ema_updates"])
        s.mem.copy_(ckpt["eps_memory"])
        s.visits.copy_(ckpt["eps_visits"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], s.mem.device)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IAATError(f"checkpoint {path} does not match this run: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    s.epoch, s.step = ckpt["epoch"], ckpt["step"]
    return ckpt["totals"]


def open_folder(cfg, s, out: Path, log, history_dtype) -> tuple:
    """Before the first step: every process agrees where it resumes; then rank 0 claims the
    folder (a lock) and keeps the best checkpoint right. Returns the metrics rows, eps history
    and the lock."""
    d, fresh = current_dist(), (s.epoch, s.step) == (0, 0)
    history = np.zeros((0, len(s.mem)), history_dtype)
    if not fresh:
        if d.main and (out / "eps_history.npy").exists():
            history = np.load(out / "eps_history.npy")[:s.epoch]
        log(f"resuming {out} at epoch {s.epoch} step {s.step}")
    same_everywhere((s.epoch, s.step), "the epoch and step to resume at")
    lock = claim_run_dir(out, s.mem.device)
    if fresh and d.main:
        write_json(out / "config.json", config_dict(cfg))
    rows = read_metrics(out / "metrics.jsonl", s.epoch)
    if d.main and s.step == 0:  # at an epoch's end, a kill may have come before best.pt
        keep_best(out, rows)
    return rows, history, lock


def best_row(rows: list) -> dict:
    """--val-size: the metrics row of the first epoch with the best held-out PGD accuracy."""
    return max(rows, key=lambda r: r["val_pgd"]) if rows and "val_pgd" in rows[0] else {}


def keep_best(out: Path, rows: list) -> None:
    """best.pt := checkpoint.pt if it holds the epoch of the last row and that epoch is the
    best; run after checkpoint.pt is written, and again on resuming from it."""
    if rows and best_row(rows) is rows[-1]:
        atomic_write(out / "best.pt", lambda p: shutil.copyfile(out / "checkpoint.pt", p))


def reduce_and_check_totals(sums: dict, s, ckpt_path: Path) -> dict:
    """The epoch's sums, all-reduced over the processes; IAATError before a non-finite loss or weight reaches
    a checkpoint (the last good one stays)."""
    totals = global_totals(sums)
    if not (math.isfinite(totals["loss"]) and all(bool(torch.isfinite(p).all())
                                                  for p in s.model.parameters())):
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else \
            "no checkpoint was written"
        raise IAATError(f"training loss became non-finite in epoch {s.epoch + 1} (by step "
                        f"{s.step}); {kept}; try a lower --lr")
    return totals


# ===== SIGTERM ===============================================================================

class StopFlag:
    """Set by SIGTERM while `sigterm_flag()` is active; the loop checkpoints and exits."""
    requested = False


@contextmanager
def sigterm_flag():
    """Within the block, SIGTERM sets StopFlag.requested instead of killing the process (only
    the main thread can install a handler; elsewhere the flag stays False)."""
    StopFlag.requested, handler = False, None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, lambda *_: setattr(StopFlag, "requested", True))
    try:
        yield StopFlag
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def stopped(epoch: int, step: int, out: Path, log: Callable[[str], None]) -> int:
    """After SIGTERM: nobody exits before rank 0's checkpoint is on disk; the exit code."""
    if current_dist().world > 1:
        tdist.barrier()
    log(f"SIGTERM: checkpoint saved at epoch {epoch} step {step} in {out}; rerun the same "
        "command to resume")
    return 143


# ===== CPU threads ===========================================================================

def idle_cores(seconds: float = 0.5) -> Optional[float]:
    """How many of the cores this process may run on were idle over the next `seconds`, from
    /proc/stat (Linux); None where it cannot tell."""
    def busy_and_total():
        with open("/proc/stat") as f:
            rows = {r[0]: [int(v) for v in r[1:9]] for r in map(str.split, f)
                    if r and r[0].startswith("cpu")}
        mine = [rows[f"cpu{c}"] for c in os.sched_getaffinity(0)]  # user .. steal of each core
        return sum(sum(t) - t[3] - t[4] for t in mine), sum(map(sum, mine)), len(mine)
    try:
        busy0, total0, cores = busy_and_total()
        time.sleep(seconds)
        busy1, total1, _ = busy_and_total()
    except (OSError, ValueError, KeyError, IndexError, AttributeError):  # not Linux, or odd /proc
        return None
    return cores * (1 - (busy1 - busy0) / max(total1 - total0, 1))


TORCH_THREADS = torch.get_num_threads()  # torch's default at start-up: one per core (or OMP_NUM_THREADS)


def choose_threads(requested: Optional[int] = None) -> tuple:
    """(threads, why): the number of CPU threads for torch's operators, and the reason.

    torch's default is one thread per core. On a quiet machine that is fastest, but when
    another process keeps a core busy, torch's threads wait on each other at every operator
    (measured on 2 cores: up to 10x slower). So the default is the number of cores idle at the
    start (an idle core counts from 70% idle), at least 1 and at most torch's default.
    `requested` (--threads, or a resumed run's count) or an OMP_NUM_THREADS the user set wins.
    It changes results: float sums run in another order, so a run records the count it used."""
    default = TORCH_THREADS
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return default, "OMP_NUM_THREADS"
    idle = idle_cores()
    if idle is None:
        return default, "torch's default, one per core"
    return max(1, min(default, int(idle + 0.3))), f"{idle:.1f} of {default} cores idle at the start"


def set_threads(requested: Optional[int], resumed: Optional[int], log: Callable[[str], None]) -> int:
    """Set torch's CPU threads for a run: `requested` (--threads), else `resumed` (a resumed
    run's count), else choose_threads's; rank 0's count on every process. Logs it; returns it."""
    threads, why = choose_threads(requested or resumed)
    threads = gather_everywhere(threads)[0]
    torch.set_num_threads(threads)
    why = "as before" if resumed and not requested else why
    log(f"{threads} CPU thread{'s' * (threads > 1)} ({why})")
    return threads
