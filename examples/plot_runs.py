"""Overlay several runs of the pre-training example in one picture: their losses and learning rates over tokens.

    python examples/plot_runs.py out/tiny-full out/tiny-relora out/tiny-lora -o compare.png

Each argument is a run's --out_dir (its metrics.jsonl is read) or a metrics.jsonl itself; a run is named after its
folder unless given as NAME=PATH. The README's comparison of --mode full|relora|lora on the same tokens is such a
picture. Reading a run that is still training is safe: its torn last line is left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from checkpoints import read_metrics  # noqa: E402
from plots import Run, draw  # noqa: E402

from relora_kernels.utils import atomic_write  # noqa: E402


def load_run(spec: str) -> Run:
    name, sep, path = spec.partition("=")
    path = Path(path if sep else spec)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise SystemExit(f"plot_runs.py: {spec}: no metrics.jsonl there (give a run's --out_dir or the file itself)")
    rows = read_metrics(metrics)
    if not any(r.get("train_loss") is not None or r.get("val_loss") is not None for r in rows):
        raise SystemExit(f"plot_runs.py: {metrics} holds no losses yet")
    return Run(name if sep else metrics.parent.name, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (--out_dir) or metrics.jsonl files; NAME=PATH to name one")
    parser.add_argument("-o", "--output", default="compare.png", help="the PNG to write (default: compare.png)")
    parser.add_argument("--title", help="the picture's title (default: the runs' names)")
    args = parser.parse_args(argv)
    runs = [load_run(spec) for spec in args.runs]
    import matplotlib.pyplot as plt

    fig = draw(runs, args.title or f"{len(runs)} runs: " + ", ".join(run.name for run in runs))
    try:
        atomic_write(Path(args.output), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
