"""raytrain on data as it arrives (tests/tabular.py's mixed table: numeric columns with 10%
missing, string columns, a string class label, a 10%-positive boolean label, a numeric target)
against scikit-learn on the same rows and the same split: its usual linear pipeline
(SimpleImputer + StandardScaler + OneHotEncoder + LogisticRegression or Ridge) and
HistGradientBoosting.

    python scripts/compare_tabular.py                  # seeds 0 1 2, 4,000 rows, 2 workers
    python scripts/compare_tabular.py --rows 20000 --seeds 0

raytrain runs `raytrain train --config configs/tabular.yaml` given only the data's path and its
label, nothing else. Prints a table and writes docs/benchmarks/tabular_mixed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.tabular import (  # noqa: E402
    make_mixed_table,
    sklearn_boosting,
    sklearn_pipeline,
    sklearn_ridge_rmse,
    write_mixed,
)

LABELS = {"species": "accuracy", "churned": "auc", "target": "rmse"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", default="2")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "tabular_mixed.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raytrain-mixed-"))
    found = []
    for seed in args.seeds:
        table = make_mixed_table(args.rows, seed)
        for label in LABELS:
            data = write_mixed(work / f"{label}-{seed}", label, args.rows, seed)
            name = f"{label}-{seed}"
            cmd = [
                sys.executable, "-m", "raytrain.main", "--config", "configs/tabular.yaml",
                "--workers", args.workers, "--no-report", "--set", f"data.path={data}",
                "--set", f"data.label_column={label}", "--storage-path", str(work / "runs"),
                "--name", name,
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
            ours = json.loads((work / "runs" / name / "results.json").read_text())["validation"]
            if label == "target":
                linear = sklearn_ridge_rmse(table)
            else:
                linear = sklearn_pipeline(table, label)
            boosting = sklearn_boosting(table, label)
            for metric in ["rmse"] if label == "target" else ["accuracy", "auc"]:
                found.append(
                    {
                        "seed": seed,
                        "label": label,
                        "metric": metric,
                        "raytrain": ours[metric],
                        "sklearn_linear": linear[metric],
                        "hist_gradient_boosting": boosting[metric],
                        "validation_rows": ours["rows"],
                    }
                )
            print(f"seed {seed} {label} done", flush=True)
    print("\nlabel | metric | seed | raytrain | scikit-learn linear | HistGradientBoosting")
    print("--- | --- | ---: | ---: | ---: | ---:")
    for r in found:
        print(
            f"{r['label']} | {r['metric']} | {r['seed']} | {r['raytrain']:.4f} | "
            f"{r['sklearn_linear']:.4f} | {r['hist_gradient_boosting']:.4f}"
        )
    medians = {}
    for label, metric in ((r["label"], r["metric"]) for r in found):
        picked = [r for r in found if (r["label"], r["metric"]) == (label, metric)]
        medians[f"{label} {metric}"] = {
            k: statistics.median(r[k] for r in picked)
            for k in ("raytrain", "sklearn_linear", "hist_gradient_boosting")
        }
    print("\nmedians over seeds:", json.dumps(medians, indent=1))
    out = {"rows": args.rows, "seeds": args.seeds, "results": found, "medians": medians}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
