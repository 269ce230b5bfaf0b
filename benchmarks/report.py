"""The results folder: one PNG per benchmark, and `SUMMARY.md` with a table of figures per benchmark."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ORDER = ("throughput", "seed_recipe", "memory", "accuracy", "upload", "causal_lm")


def _short(path: str) -> str:
    """A path relative to the repository when it is inside it (results are committed)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def fmt(x: float) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}" if abs(x) >= 0.001 or x == 0 else f"{x:.2e}"


def _goal(goal: list | None) -> str:
    return "—" if not goal else f"{goal[0].replace('>=', '≥').replace('<=', '≤')} {fmt(goal[1])}"


def _verdict(passed: bool | None) -> str:
    return "—" if passed is None else ("pass" if passed else "**FAIL**")


def table(res: dict[str, Any]) -> str:
    lines = ["| figure | value | measured | goal | result |", "|---|---|---|---|---|"]
    for f in res["figures"]:
        shown = fmt(f["value"]) + f.get("unit", "") + (f" ± {fmt(f['std'])}" if f.get("std") else "")
        measured = (f"{fmt(f['numerator'])} / {fmt(f['denominator'])} ({f['of'][0]} / {f['of'][1]})"
                    if "numerator" in f else "")
        lines.append(f"| {f['label']} | {shown} | {measured} | {_goal(f['goal'])} | {_verdict(f['passed'])} |")
    return "\n".join(lines)


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))}
    return [found[n] for n in ORDER if n in found] + [r for n, r in found.items() if n not in ORDER]


def summary_markdown(results: list[dict[str, Any]]) -> str:
    if not results:
        return "# Benchmark results\n\nNo results yet: run `make bench`.\n"
    m = results[0]["machine"]
    out = ["# Benchmark results", "",
           f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), {m.get('memory_gb', '?')} GB, {m['gpu']}; "
           f"torch {m['torch']} with {m['torch_threads']} threads, transformers {m['transformers']}, Python {m['python']}"
           + (f"; PRECISION=auto resolves to {m['precision_auto']} here." if m.get("precision_auto") else "."),
           f"Model: {results[0]['setup'].get('model_label') or results[0]['setup']['model']}; tasks: "
           f"{', '.join(results[0]['setup']['tasks'])} from `{_short(results[0]['setup']['tasks_file'])}`; "
           f"batch size {results[0]['setup']['batch_size']}, max length {results[0]['setup']['max_length']}.",
           "Every ratio is the quotient of two numbers measured in the same process run, the baseline run by the "
           "benchmark itself; `measured` shows both. Reproduce: `make bench` (quick) or `make bench BENCH_FULL=1` (full).",
           ""]
    for res in results:
        load = res["machine"].get("load_average")
        out += [f"## {res['title']}", "",
                f"`{res['benchmark']}.json` — {res['mode']} mode, {res['seconds']:.0f} s, finished {res['finished']}"
                + (f", load average (1 min) {_load(res['machine'].get('load_average_before'))} before, {load[0]:.2f} after"
                   if load else "") + ".", "",
                table(res), ""]
        out += [f"- {n}" for n in res.get("notes", [])]
        if res.get("plot"):
            out += ["", f"![{res['benchmark']}]({res['plot']})"]
        out.append("")
    failed = [f"{r['benchmark']}: {f['label']}" for r in results for f in r["figures"] if f["passed"] is False]
    out += ["## Verdict", "", "Every goal met." if not failed else "Goals missed: " + "; ".join(failed) + ".", ""]
    return "\n".join(out)


def _load(load: list | None) -> str:
    return f"{load[0]:.2f}" if load else "?"


def write_summary(out_dir: Path) -> Path:
    path = Path(out_dir) / "SUMMARY.md"
    path.write_text(summary_markdown(load_results(out_dir)))
    return path


def summary_text(out_dir: Path) -> str:
    return summary_markdown(load_results(out_dir))


# ------------------------------------------------------------------------------ plots
def plot(res: dict[str, Any], out_dir: Path) -> str | None:
    """Draw the benchmark's PNG into `out_dir`; returns its file name (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = DRAW.get(res["benchmark"], _draw_figures)(res, plt)
    fig.suptitle(f"{res['title']} ({res['mode']})", fontsize=10)
    fig.tight_layout()
    name = f"{res['benchmark']}.png"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / name, dpi=90)
    plt.close(fig)
    return name


def _bars(ax, labels: list[str], bars: list[float], dots: list[list[float]], ylabel: str, title: str) -> None:
    """One bar per configuration (the reported number) with each measured round as a dot."""
    ax.bar(range(len(labels)), bars, color=["#8899aa", "#3366aa", "#66aa66", "#aa6644"][: len(labels)])
    for i, s in enumerate(dots):
        ax.plot([i] * len(s), s, "k.", markersize=5)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)


def _against_trainer(ax, m: dict[str, Any], key: str, ylabel: str) -> None:
    """The `one_task_<precision>` runs of `against_trainer`: Trainer and multitask, per precision."""
    labels, bars, dots = [], [], []
    for name, run in m.items():
        if name.startswith("one_task_"):
            for side in ("trainer", "multitask"):
                labels.append(f"{'Trainer' if side == 'trainer' else 'multitask'}\n{run['precision']}")
                bars.append(run["fastest"][side][key])
                dots.append([r[key] for r in run[side]])
    _bars(ax, labels, bars, dots, ylabel, "1 task, same batches (dots: rounds)")


def _draw_throughput(res, plt):
    m = res["measurements"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _against_trainer(axes[0], m, "examples_per_s", "examples/s")
    three = m["three_tasks"]
    names = ("single_task_trainer", "multitask_3_tasks")
    _bars(axes[1], ["Trainer\n1 task", "multitask\n3 tasks"], [three["fastest"][n]["step_s"] for n in names],
          [[r["step_s"] for r in three[n]] for n in names], "seconds per step", f"same shapes (L={three['sequence_length']})")
    return fig


def _draw_seed_recipe(res, plt):
    m = res["measurements"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(m["whole_data"])
    _bars(axes[0], names, [m["whole_data"][a]["efficiency"] for a in names], [[] for _ in names],
          "real tokens / computed tokens", "token efficiency, whole train data")
    axes[0].set_ylim(0, 1.05)
    _bars(axes[1], names, [m["fastest"][a]["seconds"] for a in names], [[r["seconds"] for r in m["epochs"][a]] for a in names],
          "seconds", "one epoch of the timed data (dots: rounds)")
    return fig


def _draw_memory(res, plt):
    m = res["measurements"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(m)
    labels = [n.replace("_", "\n", 1).replace("_", " ") for n in names]
    rss = [[r["peak_rss_bytes"] / 2**20 for r in m[n]] for n in names]
    size = [[r["checkpoint_bytes"] / 1e6 for r in m[n]] for n in names]
    _bars(axes[0], labels, [statistics.median(x) for x in rss], rss, "MiB", "peak RSS (fresh process)")
    _bars(axes[1], labels, [statistics.median(x) for x in size], size, "MB", "saved checkpoint")
    return fig


def _draw_accuracy(res, plt):
    summary = res["measurements"]["summary"]
    keys = list(summary["multitask"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.38
    for j, kind in enumerate(("single_task", "multitask")):
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        ax.bar(xs, [summary[kind][k]["mean"] for k in keys], width, yerr=[summary[kind][k]["std"] for k in keys],
               label=kind.replace("_", "-"), capsize=3, color="#8899aa" if j == 0 else "#3366aa")
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.set_ylabel("dev metric (mean ± std over seeds)", fontsize=8)
    ax.legend(fontsize=8)
    return fig


def _draw_upload(res, plt):
    m = res["measurements"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in ("no_upload", "upload_in_flight", "upload_in_another_process") if n in m["steps"]]
    _bars(axes[0], [n.replace("_", " ").replace("in another", "in another\n") for n in names],
          [m["fastest"]["steps"][n]["step_s"] for n in names],
          [[r["step_s"] for r in m["steps"][n]] for n in names], "seconds per step", "training steps (dots: rounds)")
    names = ("plain_upload", "commit_checkpoint")
    _bars(axes[1], ["plain upload_from_filename", "commit_checkpoint"], [m["fastest"]["upload_mb_per_s"][n] for n in names],
          [[r["mb_per_s"] for r in m["throughput"][n]] for n in names], "MB/s",
          f"upload of {m['checkpoint_bytes'] / 1e6:.0f} MB to fake-gcs-server")
    return fig


def _draw_causal_lm(res, plt):
    m = res["measurements"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    _against_trainer(axes[0], m, "tokens_per_s", "real tokens/s")
    names = list(m["checkpoints"])
    labels = [n.replace("_", "\n", 1).replace("_", " ") for n in names]
    for ax, key, title in ((axes[1], "weights_bytes", "model.safetensors"), (axes[2], "checkpoint_bytes", "checkpoint folder")):
        size = [[r[key] / 1e6 for r in m["checkpoints"][n]] for n in names]
        _bars(ax, labels, [statistics.median(x) for x in size], size, "MB", title)
    return fig


def _draw_figures(res, plt):
    fig, ax = plt.subplots(figsize=(8, 4))
    figs = res["figures"]
    ax.barh(range(len(figs)), [f["value"] for f in figs])
    ax.set_yticks(range(len(figs)), [f["label"] for f in figs], fontsize=7)
    return fig


DRAW = {"throughput": _draw_throughput, "seed_recipe": _draw_seed_recipe, "memory": _draw_memory,
        "accuracy": _draw_accuracy, "upload": _draw_upload, "causal_lm": _draw_causal_lm}
