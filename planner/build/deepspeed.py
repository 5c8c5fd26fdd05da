"""DeepSpeed imported as distplan runs it: used by the deepspeed engine (planner/runner/engines/deepspeed_engine.py)
and the sharding profiler's DeepSpeed ZeRO measurement (profilers/sharding.py).

DS_ACCELERATOR is set for the device before the import. On CPU (gloo) DeepSpeed's backend would JIT-build a
shared-memory all-reduce op when it starts (about a minute); that op serves only `inference_all_reduce`, training
collectives go through torch.distributed, so it is marked unavailable and no C++ is compiled on CPU.
"""

from __future__ import annotations

import logging
import os

from planner.core.errors import DistplanError

MISSING = "engine 'deepspeed' needs DeepSpeed: pip install deepspeed"


def import_deepspeed(device_type: str):
    """Import DeepSpeed for this device: DS_ACCELERATOR set, and on CPU its shared-memory op left unbuilt."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as exc:
        raise DistplanError(f"{MISSING} ({exc})") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type != "cuda":
        # read by deepspeed.comm.torch.build_shm_op when the comm backend starts
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
