"""Clusters: GPU compute model and links as latency + bandwidth per tier.

A cluster file (configs/clusters/*.yaml, or a user's own YAML in the same format) gives the GPU's
peak dense bf16 FLOP/s, HBM capacity and bandwidth, the links per tier (intra-node, inter-node, host),
and the efficiency assumptions the cost model applies, as explicit data with their sources.
"""

from __future__ import annotations

import bisect
import re
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from planner.core.errors import DistplanError, require
from planner.core.fields import flag, integer, is_number, listing, mapping, name, number
from planner.core.fileio import parse_yaml, read_yaml
from planner.core.kerneldb import KernelDB, load_kernel_db

# the collectives a cluster's efficiencies and a profile's fits name (nccl-tests' set and p2p)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
TIERS = ("intra_node", "inter_node", "host")  # a cluster's link tiers: inside a node, between nodes, host to device


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16_tflops: float
    memory_gib: float
    hbm_bandwidth_gb_s: float
    reserved_memory_gib: float = 1.0  # CUDA context and library workspaces, unusable by tensors


@dataclass(frozen=True)
class Link:
    latency_us: float
    bandwidth_gb_s: float  # per GPU, per direction

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s * 1e9


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of datasheet peaks; every number is documented in the cluster file."""

    matmul_gflop_fraction: tuple[tuple[float, float], ...]  # (GFLOP per GEMM, fraction of peak), ascending
    memory_bound_fraction: float = 0.8
    attention_fraction: float = 0.4  # fused (flash) attention kernels, of peak, on the FLOPs they execute
    collective_fraction: tuple[tuple[str, float], ...] = tuple((c, 0.7) for c in COLLECTIVES)
    overlap_slowdown: float = 0.1
    cpu_adam_params_per_s: float = 1e9

    def matmul_fraction(self, gflop: float) -> float:
        """Fraction of peak for one GEMM of `gflop` GFLOP: piecewise linear in log(size), flat outside."""
        pts = self.matmul_gflop_fraction
        sizes = [p[0] for p in pts]
        if gflop <= sizes[0]:
            # below the smallest measured size a GEMM is launch-bound: time stops shrinking with size
            return pts[0][1] * gflop / sizes[0]
        if gflop >= sizes[-1]:
            return pts[-1][1]
        i = bisect.bisect_right(sizes, gflop)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        w = (math.log(gflop) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return y0 + w * (y1 - y0)

    def collective(self, op: str) -> float:
        return dict(self.collective_fraction)[op]


@dataclass(frozen=True)
class Cluster:
    name: str
    gpu: GPU
    gpus_per_node: int
    links: tuple[tuple[str, Link], ...]
    efficiency: Efficiency
    max_nodes: int = 0  # 0: as many as asked for
    host_memory_gib: float = 0.0  # CPU memory per node, for optimizer offload (0: unknown, not checked)
    # the "GPU" is the host's CPU (a CPU + gloo profile): device memory and host memory are one pool, so a rank's
    # offloaded optimizer states come out of its share of the device memory
    host_is_device: bool = False
    # the GPU's measured kernel database (configs/hardware/<name>.yaml): without a profile, layers are priced from it
    # kernel by kernel (planner/cost/kernels.py) instead of the efficiency fractions; "" for none
    kernel_database: str = ""
    kernels: KernelDB | None = field(default=None, compare=False, repr=False)
    # what the cost model assumes about mechanisms no measurement has checked (planner/cost/mechanisms.py):
    # "expected" (the best estimate) or "pessimistic" (their conservative bound); a view, never in the file
    assume: str = "expected"

    def pessimistic(self) -> "Cluster":
        """This cluster with every unchecked mechanism at its conservative bound (what `solve` ranks by)."""
        return replace(self, assume="pessimistic")

    def link(self, tier: str) -> Link:
        return dict(self.links)[tier]

    @property
    def usable_memory_gib(self) -> float:
        return self.gpu.memory_gib - self.gpu.reserved_memory_gib

    @property
    def host_memory_gib_per_gpu(self) -> float:
        """Each GPU's share of its node's CPU memory (0: unknown)."""
        return self.host_memory_gib / self.gpus_per_node

    def to_dict(self) -> dict:
        d = {"gpu": asdict(self.gpu)}  # not asdict(self): that would walk the kernel database
        return {
            "version": 1,
            "name": self.name,
            "gpus_per_node": self.gpus_per_node,
            "max_nodes": self.max_nodes,
            "host_memory_gib": self.host_memory_gib,
            **({"host_is_device": True} if self.host_is_device else {}),
            **({"kernel_database": self.kernel_database} if self.kernel_database else {}),
            "gpu": d["gpu"],
            "links": {tier: asdict(link) for tier, link in self.links},
            "efficiency": {
                "matmul_gflop_fraction": [list(p) for p in self.efficiency.matmul_gflop_fraction],
                "memory_bound_fraction": self.efficiency.memory_bound_fraction,
                "attention_fraction": self.efficiency.attention_fraction,
                "collective_fraction": dict(self.efficiency.collective_fraction),
                "overlap_slowdown": self.efficiency.overlap_slowdown,
                "cpu_adam_params_per_s": self.efficiency.cpu_adam_params_per_s,
            },
        }


# ---- loading --------------------------------------------------------------------------------

MAX_GPUS = 2**20  # largest GPU count planned (1,048,576): 10x the largest training clusters built (~100k GPUs)


def _num(d: dict, key: str, where: str, positive: bool = True, fraction: bool = False) -> float:
    """d[key]: a finite number > 0 (`positive`) or >= 0; a `fraction` of a peak is at most 1."""
    return number(d, key, where, 0, above=positive, maximum=1.0 if fraction else None)


def _map(d: dict, key: str, where: str) -> dict:
    return mapping(d, key, where)


def cluster_from_dict(data: object, source: str) -> Cluster:
    require(isinstance(data, dict), f"{source}: expected a mapping with keys name, gpu, gpus_per_node, links, efficiency")
    g = _map(data, "gpu", source)
    gpu = GPU(
        name=name(g, "name", f"{source}: gpu"),
        peak_bf16_tflops=_num(g, "peak_bf16_tflops", f"{source}: gpu"),
        memory_gib=_num(g, "memory_gib", f"{source}: gpu"),
        hbm_bandwidth_gb_s=_num(g, "hbm_bandwidth_gb_s", f"{source}: gpu"),
        reserved_memory_gib=number(g, "reserved_memory_gib", f"{source}: gpu", 0, default=1.0),
    )
    links_raw = _map(data, "links", source)
    links = []
    for tier in TIERS:
        lk = _map(links_raw, tier, f"{source}: links")
        links.append((tier, Link(_num(lk, "latency_us", f"{source}: links.{tier}", positive=False),
                                 _num(lk, "bandwidth_gb_s", f"{source}: links.{tier}"))))
    e = _map(data, "efficiency", source)
    pts = listing(e, "matmul_gflop_fraction", f"{source}: efficiency")
    require(len(pts) >= 1 and all(isinstance(p, list) and len(p) == 2 and is_number(p[0]) and is_number(p[1])
                                  and p[0] > 0 and 0 < p[1] <= 1 for p in pts),
            f"{source}: efficiency.matmul_gflop_fraction must be a list of [gflop > 0, 0 < fraction <= 1] pairs, "
            f"got {str(pts)[:60]}")
    pts = sorted((float(a), float(b)) for a, b in pts)
    coll = _map(e, "collective_fraction", f"{source}: efficiency")
    missing = [c for c in COLLECTIVES if c not in coll]
    require(not missing, f"{source}: efficiency.collective_fraction is missing {', '.join(missing)}")
    eff = Efficiency(
        matmul_gflop_fraction=tuple(pts),
        memory_bound_fraction=_num(e, "memory_bound_fraction", f"{source}: efficiency", fraction=True),
        attention_fraction=_num(e, "attention_fraction", f"{source}: efficiency", fraction=True),
        collective_fraction=tuple((c, _num(coll, c, f"{source}: efficiency.collective_fraction", fraction=True))
                                  for c in COLLECTIVES),
        overlap_slowdown=_num(e, "overlap_slowdown", f"{source}: efficiency", positive=False),
        cpu_adam_params_per_s=_num(e, "cpu_adam_params_per_s", f"{source}: efficiency"),
    )
    gpn = integer(data, "gpus_per_node", source, 1, MAX_GPUS)
    max_nodes = integer(data, "max_nodes", source, 0, MAX_GPUS, default=0)
    host = number(data, "host_memory_gib", source, 0, default=0.0)
    db_name = name(data, "kernel_database", source, default="")
    return Cluster(name=name(data, "name", source, default=Path(source).stem), gpu=gpu, gpus_per_node=gpn,
                   links=tuple(links), efficiency=eff, max_nodes=max_nodes, host_memory_gib=host,
                   host_is_device=flag(data, "host_is_device", source, default=False), kernel_database=db_name,
                   kernels=_kernel_db(db_name, source) if db_name else None)


def _kernel_db(db_name: str, source: str) -> KernelDB:
    """The kernel database a cluster file names: a file under configs/hardware/ or a path to one."""
    try:
        return load_kernel_db(db_name)
    except DistplanError as exc:
        raise DistplanError(f"{source}: kernel_database '{db_name}': {exc}") from None


def cluster_names() -> list[str]:
    root = resources.files("configs") / "clusters"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_cluster(name_or_path: str) -> Cluster:
    """A preset name (configs/clusters/) or a path to a cluster YAML file."""
    if name_or_path in cluster_names():
        source = f"cluster preset '{name_or_path}'"
        return cluster_from_dict(parse_yaml((resources.files("configs") / "clusters" / f"{name_or_path}.yaml").read_text(),
                                            source), source)
    presets = f"presets: {', '.join(cluster_names())}"
    if Path(name_or_path).suffix not in (".yaml", ".yml"):
        raise DistplanError(f"unknown cluster '{name_or_path}': not a preset nor a .yaml file; {presets}")
    data = read_yaml(name_or_path, "cluster file", hint=f" (nor is it a preset; {presets})")
    return cluster_from_dict(data, str(name_or_path))


def check_gpu_count(cluster: Cluster, gpus: int) -> None:
    require(isinstance(gpus, int) and not isinstance(gpus, bool) and 0 < gpus <= MAX_GPUS,
            f"--gpus must be a positive integer of at most {MAX_GPUS} (2**20), got {gpus}")
    if cluster.max_nodes:
        most = cluster.max_nodes * cluster.gpus_per_node
        require(gpus <= most, f"--gpus {gpus} exceeds cluster '{cluster.name}': {cluster.max_nodes} nodes x {cluster.gpus_per_node} GPUs = {most}")
    if gpus > cluster.gpus_per_node:
        require(gpus % cluster.gpus_per_node == 0,
                f"--gpus {gpus} spans nodes but is not a multiple of {cluster.gpus_per_node} GPUs per node on '{cluster.name}'")


def with_overrides(cluster: Cluster, **changes) -> Cluster:
    """A copy with some fields replaced (used by profiles to substitute measured numbers)."""
    from dataclasses import replace

    return replace(cluster, **changes)


def gpu_family(name: str) -> str:
    """The chip of a GPU name, for matching profiles to clusters.

    'NVIDIA H200', 'H200-SXM-141GB' -> 'H200'; 'NVIDIA A100-SXM4-80GB' -> 'A100'; 'NVIDIA L40S' -> 'L40S'.
    Names without a chip token (e.g. 'NVIDIA GeForce RTX 4090') compare by their whole upper-cased name.
    """
    text = re.sub(r"\bNVIDIA\b", " ", name.upper())
    m = re.search(r"(?<![A-Z0-9])([A-Z]{1,3}\d{2,4}[A-Z]?)(?![A-Z0-9])", text)
    return m.group(1) if m else " ".join(text.split())
