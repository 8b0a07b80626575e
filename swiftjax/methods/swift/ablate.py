"""Run every SWIFT ablation config in a folder and write a markdown table of Best-of-N.

    swiftjax ablate [configs/ablations] [key=value ...]

Each YAML there extends configs/demo.yaml; all of them share the demo's sampled candidates and
feature stores (``cache``, default runs/demo), so an ablation costs one head training (plus a
feature extraction when it changes the features).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from swiftjax.config import parse_typed
from swiftjax.methods.swift import pipeline


DEMO_OUT = Path("runs/demo")


def run_all(folder: Path, overrides, out_root: Path = Path("runs/ablations")) -> list[dict]:
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise ValueError(f"ablate: expected *.yaml configs in {folder}, found none")
    rows = []
    for f in files:
        cfg = parse_typed(pipeline.SwiftRunConfig, [str(f), *overrides, f"out={out_root / f.stem}"], "ablate")
        if cfg.cache is None:  # share the demo's candidates and feature stores
            cfg = dataclasses.replace(cfg, cache=str(DEMO_OUT))
        print(f"\n=== ablation {f.stem}")
        res = pipeline.run(cfg, report=False)
        rows.append({"name": f.stem, "bon": res["bon"], "n": res["n"], "pass@1": res["pass@1"],
                     "feature_dim": res["swift"]["feature_dim"], "num_params": res["swift"]["num_params"],
                     "epochs": res["swift"]["epochs_run"], "n_test_problems": res["n_test_problems"]})
    return rows


def markdown(rows: list[dict]) -> str:
    n = str(rows[0]["n"])
    lines = [f"| ablation | F | head params | SWIFT@4 | SWIFT@{n} | majority@{n} | oracle@{n} | epochs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        b = r["bon"]
        lines.append(f"| {r['name']} | {r['feature_dim']} | {r['num_params']} | {b['swift']['4']:.1f} | "
                     f"{b['swift'][n]:.1f} | {b['majority'][n]:.1f} | {b['oracle'][n]:.1f} | {r['epochs']:.1f} |")
    lines.append(f"\npass@1 {rows[0]['pass@1']:.1f}%, {rows[0]['n_test_problems']} test problems, N = {n}.")
    return "\n".join(lines)


def main(argv) -> int:
    folder = Path(argv[0]) if argv and "=" not in argv[0] else Path("configs/ablations")
    overrides = argv[1:] if argv and "=" not in argv[0] else argv
    out_root = Path("runs/ablations")
    rows = run_all(folder, overrides, out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out_root / "results.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
