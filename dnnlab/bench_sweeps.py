"""`dnnlab bench`'s sweeps: one job against a stacked sweep of --jobs jobs, and one sweep through each launcher
(basic, joblib, stacked), both alternately round after round."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from dnnlab.bench_report import markdown
from dnnlab.bench_speed import median_after_warmup
from dnnlab.bench_workers import cli, task_overrides


def stacked_table(args, data_root: Path, tmp: Path) -> tuple[list[dict], dict]:
    import csv

    base = task_overrides(data_root, args.val_size, args.epochs + 1)
    lrs = ["0.0003", "0.0005", "0.001", "0.002", "0.003", "0.005", "0.0001", "0.0002"]
    n_lr = min(len(lrs), max(1, args.jobs // 2)) if args.jobs > 1 else 1
    sweep = [f"optimizer.lr={','.join(lrs[:n_lr])}", f"trainer.seed=range(1,{args.jobs // n_lr + 1})"]

    def epoch_seconds(run_dir: Path) -> list[float]:
        with open(run_dir / "metrics.csv") as f:
            return [float(r["seconds"]) for r in csv.DictReader(f)]

    rows, raw = [], {}
    single_dir, sweep_dir = tmp / "single", tmp / "stacked"
    runs = [("1 job, dnnlab train", ["train", *base, f"hydra.run.dir={single_dir}"], [single_dir]),
            (f"{args.jobs} jobs, hydra/launcher=stacked", ["train", "-m", "hydra/launcher=stacked",
                                                           "hydra.launcher.cpu=stack", *sweep, *base,
                                                           f"hydra.sweep.dir={sweep_dir}"], None)]
    if args.jobs > 1 and args.sequential:
        runs.append((f"{args.jobs} jobs, basic launcher (one at a time)",
                     ["train", "-m", *sweep, *base, f"hydra.sweep.dir={tmp / 'sequential'}"], None))
    single = None
    measured: dict[str, list[tuple[float, float, dict, int]]] = {name: [] for name, *_ in runs}
    for round_ in range(args.rounds):  # alternately, like the speed table: a busy spell hits both alike
        for name, argv, dirs in runs:
            print(f"  round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            out = Path(argv[-1].split("=", 1)[1])
            shutil.rmtree(out, ignore_errors=True)
            result = cli(argv, tmp)
            found = dirs or sorted((p for p in out.iterdir() if p.is_dir() and p.name.isdigit()),
                                   key=lambda p: int(p.name)) if out.is_dir() else []
            raw.setdefault(name, []).append(result)
            if "error" in result or result.get("exit_code") or not found or \
                    not all((d / "metrics.csv").is_file() for d in found):
                continue
            summary = json.loads((found[0] / "summary.json").read_text())
            measured[name].append((median_after_warmup(epoch_seconds(found[0])), result["wall_seconds"],
                                   {**summary, "peak_rss_mb": result["peak_rss_mb"]}, len(found)))
    for name, *_ in runs:
        got = measured[name]
        if not got:
            errors = [str(r.get("error", r.get("exit_code"))) for r in raw.get(name, [])]
            rows.append({"run": name, "jobs": "", "wall s": "failed", "s/epoch": "", "s/epoch per job": "",
                         "x 1 job (epoch)": "", "x 1 job (wall)": "", "peak RSS MB": "", "threads": "",
                         "note": "; ".join(errors)[:160]})
            continue
        per_epoch = statistics.median(g[0] for g in got)
        wall = statistics.median(g[1] for g in got)
        summary, n_jobs = got[-1][2], got[-1][3]
        if single is None:
            single = (per_epoch, wall)
        rows.append({"run": name, "jobs": n_jobs, "wall s": round(wall, 2), "s/epoch": round(per_epoch, 3),
                     "s/epoch per job": round(per_epoch / n_jobs, 3), "x 1 job (epoch)": round(per_epoch / single[0], 2),
                     "x 1 job (wall)": round(wall / single[1], 2), "peak RSS MB": round(max(g[2]["peak_rss_mb"]
                                                                                        for g in got)),
                     "threads": "/".join(str(g[2].get("threads")) for g in got),
                     "note": "" if "stacked" not in summary else f"{summary['stacked']['jobs']} jobs in one stack; "
                             f"per round: " + ", ".join(f"{g[0]:.2f} s" for g in got)})
    return rows, raw


def stacked_section(args, root: Path, tmp: Path, out: Path, nproc: int) -> tuple[dict, list[str]]:
    """Table 2."""
    from dnnlab.runs import write_table

    print(f"stacked sweeps: 1 job, then {args.jobs} jobs", flush=True)
    stacked, raw = stacked_table(args, root, tmp / "stacked")
    write_table(stacked, out / "stacked", f"Stacked sweeps of the default network ({nproc} cores)",
                ["note"], [r["note"] for r in stacked])
    return ({"stacked": {"rows": stacked, "results": raw}},
            [markdown("Stacked sweeps (learning rates x seeds), the default network", stacked)])


# The launcher comparison's contenders: the same sweep through each, in this order every round.
LAUNCHERS = {
    "basic (one job at a time)": [],
    "joblib (n_jobs: every core)": ["hydra/launcher=joblib", "hydra.launcher.n_jobs={cores}"],
    "stacked (on a CPU with 2+ cores: joblib)": ["hydra/launcher=stacked"],
    "stacked, cpu=stack (one stack)": ["hydra/launcher=stacked", "hydra.launcher.cpu=stack"],
}


def sweep_val_acc(out: Path) -> dict[int, float]:
    """{job number: its best validation accuracy} of a finished sweep folder."""
    found = {}
    for path in out.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("status") == "completed":
            found[int(path.parent.name)] = summary["val_acc"]
    return found


def launcher_table(args, data_root: Path, tmp: Path, cores: int) -> tuple[list[dict], dict]:
    """One sweep (4 learning rates x 2 seeds of the default network on all of Fashion-MNIST, early stopping off;
    --quick: 2 jobs) through each launcher, round after round: wall time of the whole command, and how far each
    job's best validation accuracy is from the same job run alone by the basic launcher (the last round's)."""
    from dnnlab.runs import slug

    epochs, lrs, seeds = args.epochs + 1, ["0.0001", "0.0003", "0.001", "0.003"], ["1", "2"]
    if args.quick:
        lrs, seeds = lrs[2:], seeds[:1]
    n_jobs = len(lrs) * len(seeds)
    sweep = [f"optimizer.lr={','.join(lrs)}", f"trainer.seed={','.join(seeds)}",
             *task_overrides(data_root, args.val_size, epochs, classes=None), *args.override]
    walls: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    accs: dict[str, dict[int, float]] = {}
    for round_ in range(args.rounds):
        for name, launcher in LAUNCHERS.items():
            print(f"  round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            out = tmp / slug(name)
            shutil.rmtree(out, ignore_errors=True)
            result = cli(["train", "-m", *[o.format(cores=cores) for o in launcher], *sweep,
                          f"hydra.sweep.dir={out}"], tmp)
            accs[name] = sweep_val_acc(out)
            if "error" not in result and not result.get("exit_code") and len(accs[name]) == n_jobs:
                walls[name].append(result["wall_seconds"])
    basic = accs.get(next(iter(LAUNCHERS)), {})
    base_wall = statistics.median(walls[next(iter(LAUNCHERS))] or [float("nan")])
    rows = []
    for name in LAUNCHERS:
        wall = statistics.median(walls[name]) if walls[name] else None
        gaps = [abs(acc - basic[job]) * 100 for job, acc in accs.get(name, {}).items() if job in basic]
        rows.append({"launcher": name, "wall s": round(wall, 1) if wall else "failed",
                     "per round": ", ".join(f"{w:.1f}" for w in walls[name]),
                     "x basic": round(wall / base_wall, 2) if wall else "",
                     "max val_acc gap to alone, pp": round(max(gaps), 2) if gaps else "",
                     "mean val_acc": round(statistics.mean(accs[name].values()), 4) if accs.get(name) else ""})
    return rows, {"epochs": epochs, "jobs": n_jobs, "sweep": sweep, "walls": walls, "val_acc": accs}


def launcher_section(args, root: Path, tmp: Path, out: Path, nproc: int) -> tuple[dict, list[str]]:
    """Table 4: the launchers on one sweep."""
    from dnnlab.runs import write_table

    print("launchers: one sweep through basic, joblib and stacked, alternately", flush=True)
    rows, raw = launcher_table(args, root, tmp / "launchers", nproc)
    title = (f"One sweep of {raw['jobs']} jobs (learning rates x seeds, the default network, {raw['epochs']} epochs, "
             f"all of Fashion-MNIST) through each launcher, {nproc} cores")
    write_table(rows, out / "launchers", title)
    return {"launchers": {"rows": rows, **raw}}, [markdown(title, rows)]
