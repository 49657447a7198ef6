"""The learned-switch experiment's table and on/off map from its run folders (issue 19).

    python benchmarks/learned_switch_report.py runs/switch/* --output docs/results/learned_switch --throughput

Every argument is a `ctxagg train` run folder (container_auto under --dynamic-budget, container_light, container,
any seeds). Writes switch_map.png (one row per run, one cell per block: dynamic path on/off), switch_report.md
(per setting: last/best top-1 mean ± sd over seeds, deployed GMACs and parameters at the training resolution,
dynamic paths kept, fp32 images/s with --throughput; then one line per run) and switch_report.json.
See ctxagg.analysis.switch_map.
"""
from __future__ import annotations

import argparse

from ctxagg.analysis.switch_map import switch_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by `ctxagg train`")
    parser.add_argument("--output", required=True, help="folder for switch_map.png, switch_report.md and .json")
    parser.add_argument("--throughput", action="store_true",
                        help="also measure each deployed model's fp32 images/s on this machine (slow)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the throughput measurement")
    args = parser.parse_args()
    report = switch_report(args.runs, args.output, args.throughput, args.batch_size)
    print(report["table"])
    print(f"\nwrote {report['output']}/switch_map.png, switch_report.md, switch_report.json")


if __name__ == "__main__":
    main()
