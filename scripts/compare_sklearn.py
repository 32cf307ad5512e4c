"""raytrain's defaults against scikit-learn on tabular data whose features run from 0.001 to 1,000
(tests/tabular.py): the same rows, the same split, validation accuracy side by side.

    python scripts/compare_sklearn.py                 # 4,000 rows, 2 workers
    python scripts/compare_sklearn.py --rows 20000 --seeds 0 1 2

For each seed it writes the data as Parquet, trains `raytrain train` with default settings (only
the data's path and columns given) and fits scikit-learn's LogisticRegression on a standardised
copy of the same training rows; prints a table and writes docs/benchmarks/tabular.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.tabular import FEATURES, LABEL, make_table, sklearn_accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", default="2")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "tabular.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raytrain-tabular-"))
    rows = []
    for seed in args.seeds:
        import pyarrow.parquet as pq

        data = work / f"seed-{seed}"
        data.mkdir()
        table = make_table(args.rows, seed)
        pq.write_table(table, data / "data.parquet")
        name = f"tabular-{seed}-{int(time.time())}"
        cmd = [
            sys.executable,
            "-m",
            "raytrain.main",
            "--workers",
            args.workers,
            "--no-report",
            "--set",
            f"data.path={data}",
            "--set",
            f"data.feature_columns={FEATURES}",
            "--set",
            f"data.label_column={LABEL}",
            "--storage-path",
            str(work / "runs"),
            "--name",
            name,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        results = json.loads((work / "runs" / name / "results.json").read_text())
        theirs, val_rows = sklearn_accuracy(table)
        ours = results["validation"]["accuracy"]
        rows.append(
            {
                "seed": seed,
                "rows": args.rows,
                "val_rows": val_rows,
                "raytrain": ours,
                "sklearn": theirs,
                "difference_points": 100 * (ours - theirs),
            }
        )
    print("seed | rows | validation rows | raytrain | scikit-learn | difference (points)")
    print("--- | ---: | ---: | ---: | ---: | ---:")
    for r in rows:
        print(
            f"{r['seed']} | {r['rows']:,} | {r['val_rows']:,} | {r['raytrain']:.1%} | "
            f"{r['sklearn']:.1%} | {r['difference_points']:+.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "runs": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
