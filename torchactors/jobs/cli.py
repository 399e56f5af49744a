"""The ``torchactors`` command: ``run``, ``validate`` and ``plot`` a YAML job.

Box: top layer, the user's entry point. It only parses arguments, loads the config (so a bad
file fails with exit code 2 before anything starts) and maps outcomes to exit codes:

    0 ok    1 the job failed    2 bad config or usage    3 a role's actors did not start within
    its start_timeout (the job was stopped)    130 stopped by Ctrl-C (after a clean stop)

Only ``run`` starts the runtime (``ta.init``): ``validate`` and ``plot`` start no process.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from torchactors.errors import ConfigError, UnsafeDirectoryError
from torchactors.jobs.config import load_config
from torchactors.jobs.interrupts import EXIT_INTERRUPTED
from torchactors.jobs.plot import PlotError, plot_run
from torchactors.jobs.runner import StartTimeoutError, run_job

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_START_TIMEOUT = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchactors", description="Run YAML jobs of PyTorch actors.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,validate,plot}")

    run = sub.add_parser("run", help="start a job's actors and run its program",
                         description="Start a job's actors, run its program, write metrics and a summary.")
    run.add_argument("job", help="the job's YAML file")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override a config value, e.g. roles.rollout.replicas=3 stop.max_seconds=30")
    run.add_argument("--out", metavar="DIR", help="output directory (default runs/<job name>-<time>)")

    val = sub.add_parser("validate", help="check a job file without starting anything",
                         description="Check a job file: keys, types, values, and that classes import.")
    val.add_argument("job", help="the job's YAML file")
    val.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as for run")

    plot = sub.add_parser("plot", help="plot a run's metrics.csv to curves.png",
                          description="Plot mean return and frames/s over time from DIR/metrics.csv.")
    plot.add_argument("dir", help="a run's output directory")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides appear after ``--out DIR`` too."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if item.startswith("-") or "=" not in item or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides.append(item)
    return args


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.job, args.overrides)
    print(f"OK: {args.job} ({len(cfg.roles)} roles, {cfg.num_processes} processes)")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.job, args.overrides)

    try:
        summary = run_job(cfg, args.out)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StartTimeoutError as e:
        print(f"torchactors: job {cfg.job.name} failed: {e}", file=sys.stderr)
        return EXIT_START_TIMEOUT
    except UnsafeDirectoryError as e:     # nothing started: what is wrong and what to do is all there is
        print(f"torchactors: job {cfg.job.name} not started: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        traceback.print_exc()
        print(f"torchactors: job {cfg.job.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_INTERRUPTED if summary["stopped_by"] == "interrupted" else EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        out, rows = plot_run(Path(args.dir))
    except PlotError as e:
        print(f"torchactors plot: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out} ({rows} rows)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchactors`` console script; returns the exit code."""
    args = _parse(argv)
    logging.basicConfig(level={0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _import_from_cwd()
    commands = {"run": _cmd_run, "validate": _cmd_validate, "plot": _cmd_plot}
    try:
        return commands[args.command](args)
    except ConfigError as e:
        print(f"torchactors: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _import_from_cwd() -> None:
    """Let ``class: mymodule:Actor`` find ./mymodule.py, as ``python -m`` would (actors get our sys.path)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


if __name__ == "__main__":
    sys.exit(main())
