"""Megatron-LM's own validation of emitted argument files: parse_args + validate_args + TransformerConfig.

Usage (Python >= 3.12 with megatron-core >= 0.17, which ships megatron.training; torch; a GPU is optional):
    python benchmarks/megatron_args_check.py tests/emitters/golden/emit/*/megatron/megatron_args.txt \
        -o benchmarks/results/megatron_args_check.json

Standalone on purpose (imports nothing from distplan), so it runs on a machine that has Megatron but not
distplan. Each file is one argument per line with '#' comments, as `distplan emit --target megatron` writes;
the comments `# distplan-world-size: N` and `# distplan-env: KEY=VALUE` give the world size and environment
the launch would have. Every file is checked in a fresh interpreter (parse_args reads sys.argv and
validate_args changes process state) as rank 0 of that world:
    megatron.training.arguments.parse_args() -> validate_args(args) -> core_transformer_config_from_args(args)
Shims, recorded per file in the result when used:
- no CUDA device: validate_args asks the GPU's architecture for the CUDA_DEVICE_MAX_CONNECTIONS rule; it is
  answered 9 (Hopper), the architecture the plans target;
- no Transformer Engine: TransformerConfig refuses the default rope fusion without it; --no-rope-fusion is added.
Writes one JSON with the versions and, per file, ok / error / shims / what Megatron derived. Exit 0 if all pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

WORLD_TAG = re.compile(r"^#\s*distplan-world-size:\s*(\d+)\s*$")
ENV_TAG = re.compile(r"^#\s*distplan-env:\s*(\w+)=(\S*)\s*$")

# runs in a fresh interpreter per file; reads {"argv": [...]} on stdin, prints one JSON line
CHILD = r"""
import importlib.util, json, sys, traceback
req = json.load(sys.stdin)
argv, shims = list(req["argv"]), []
out = {"ok": False, "error": None, "shims": shims, "derived": {}}
try:
    import torch
    import megatron.training.arguments as A
    if not torch.cuda.is_available():
        A.get_device_arch_version = lambda: 9
        shims.append("no CUDA device: GPU architecture taken as 9 (Hopper)")
    if importlib.util.find_spec("transformer_engine") is None and "--no-rope-fusion" not in argv:
        argv.append("--no-rope-fusion")
        shims.append("no Transformer Engine: --no-rope-fusion")
    sys.argv = ["pretrain_gpt.py"] + argv
    args = A.parse_args()
    A.validate_args(args)
    cfg = A.core_transformer_config_from_args(args)
    out["derived"] = {
        "world_size": args.world_size, "data_parallel_size": args.data_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
        "num_layers_in_first_pipeline_stage": cfg.num_layers_in_first_pipeline_stage,
        "num_layers_in_last_pipeline_stage": cfg.num_layers_in_last_pipeline_stage,
        "pipeline_model_parallel_layout": str(cfg.pipeline_model_parallel_layout) if cfg.pipeline_model_parallel_layout is not None else None,
        "recompute_granularity": cfg.recompute_granularity, "recompute_modules": cfg.recompute_modules,
        "sequence_parallel": cfg.sequence_parallel, "expert_model_parallel_size": cfg.expert_model_parallel_size,
        "expert_tensor_parallel_size": cfg.expert_tensor_parallel_size,
    }
    out["ok"] = True
except BaseException as exc:  # validate_args asserts; argparse exits; TransformerConfig raises ValueError
    lines = [l for l in str(exc).splitlines() if l.strip()]
    out["error"] = type(exc).__name__ + (": " + lines[0] if lines else "")
    out["traceback"] = traceback.format_exc().splitlines()[-6:]
print("DISTPLAN-RESULT " + json.dumps(out, default=str))
"""


def read_args_file(path: Path) -> tuple[list[str], int | None, dict[str, str]]:
    argv, world, env = [], None, {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if m := WORLD_TAG.match(line):
            world = int(m.group(1))
        elif m := ENV_TAG.match(line):
            env[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            argv += line.split()
    return argv, world, env


def check_file(path: Path, timeout_s: float = 300.0) -> dict:
    argv, world, env = read_args_file(path)
    res = {"file": str(path), "world_size": world, "env": env, "ok": False, "error": None, "shims": []}
    if world is None:
        res["error"] = "no '# distplan-world-size: N' line"
        return res
    child_env = {**os.environ, **env, "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps({"argv": argv}), capture_output=True,
                          text=True, env=child_env, timeout=timeout_s)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("DISTPLAN-RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        res["error"] = f"checker exited {proc.returncode} without a result: {' | '.join(tail)}"
        return res
    res.update(json.loads(line[len("DISTPLAN-RESULT "):]))
    return res


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "unknown")
        except Exception as exc:  # not installed, or fails to import: record why
            out[mod] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        out["cuda_device"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="megatron_args.txt files written by distplan emit")
    ap.add_argument("-o", "--output", type=Path, default=Path("megatron_args_check.json"))
    args = ap.parse_args(argv)
    results = [check_file(f) for f in args.files]
    report = {"check": "megatron.training parse_args + validate_args + core_transformer_config_from_args",
              "versions": versions(), "passed": sum(r["ok"] for r in results), "failed": sum(not r["ok"] for r in results),
              "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for r in results:
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['file']}" + (f"  {r['error']}" if r["error"] else "")
              + (f"  [shims: {'; '.join(r['shims'])}]" if r.get("shims") else ""))
    print(f"{report['passed']} passed, {report['failed']} failed")
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
