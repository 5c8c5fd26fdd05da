"""Combine two kernel databases of one GPU: the base file with every section the newer file measured taken from it
(profilers.hardware.merge_databases), e.g. a re-run of `distplan profile --hardware --only memory_bound`.

Use: python3 benchmarks/merge_hardware.py BASE.yaml NEWER.yaml -o OUT.yaml
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.core.fileio import atomic_write_files, dump_yaml, read_yaml  # noqa: E402
from planner.core.kerneldb import kernel_db_from_dict  # noqa: E402
from profilers.hardware import merge_databases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("newer", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    merged = merge_databases(read_yaml(args.base, "kernel database"), read_yaml(args.newer, "kernel database"))
    kernel_db_from_dict(merged, str(args.out))  # the result must load
    head = (f"# distplan kernel database: {merged['gpu_name']}, {merged['dtype']}; {args.base.name} with "
            f"{', '.join(merged['facts']['merged']['from_newer'])} from {args.newer.name} "
            f"(benchmarks/merge_hardware.py)\n")
    atomic_write_files({args.out: head + dump_yaml(merged, sort_keys=False, width=120)})
    print(f"wrote {args.out}: {', '.join(merged['facts']['merged']['from_newer'])} from {args.newer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
