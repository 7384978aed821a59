"""Benchmark v2 of the sparse MoE convolution op against the slim conv (the ideal) and the masked MoE.

Candidates, all on the SAME tensors (channels_last on GPU, contiguous on CPU), per (shape, batch, pass):

- ``slim``:          F.conv2d with only the active width k*w, bias included (cuDNN/oneDNN fuse it): the ideal;
- ``slim+epilogue``: the slim conv without bias, then bias and gate as a separate elementwise pass;
- ``masked``:        the research code's MoE: F.conv2d with all E*w channels, then zero the unselected ones;
- every backend present for the device (``reference``, ``slices``, ``cpu``; ``triton``, ``cuda`` on a GPU).

Routing is random and balanced. ``fwd`` runs under no_grad without a gate; ``fwd+bwd`` takes
``torch.autograd.grad`` of the output (given grad_out) with respect to x, weight, bias (and the gate).

GPU (``--device cuda``): ``torch.backends.cudnn.benchmark = True``; TF32 allowed for fp32 (stated in the JSON);
warm-up past autotuning; device time = a CUDA graph of 20 calls replayed 30 times, median / 20 (a candidate
that cannot be captured, e.g. one that reads device memory on the host, gets ``graph_ms = null`` and the
reason); eager single-call latency (median of interleaved runs); one torch.profiler pass of 5 calls counting
kernels, device-to-host copies and synchronisations per call. CPU: eager times, and with ``--processes 3``
min/median/max over 3 separate processes (never the best run).

Every row has ms, ratio to slim, % of the H200 roofline (989 TFLOP/s bf16/fp16, 494 TFLOP/s TF32, 4.8 TB/s;
time bound = max(FLOPs / peak, bytes / bandwidth), FLOPs = 2 x multiply-adds of the active channels) and the
max abs error vs an fp32 reference (the reference backend in fp32 on the same inputs). The JSON records
commit, command and torch/triton/CUDA versions. ``write_claims`` writes ``claims.json``.

    python benchmarks/bench_op.py --quick                        # CPU smoke run (tests)
    python benchmarks/bench_op.py --processes 3                   # CPU, min/median/max of 3 processes
    python benchmarks/bench_op.py --device cuda --dtype bf16 --batch 256 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import moe_kernels  # noqa: E402
from advmoe.bench.timing import device_description, device_slug
from advmoe.bench.timing import median_ms as time_interleaved
from moe_kernels import sparse_moe_conv2d  # noqa: E402
from moe_kernels._triton.tune import TUNE_SHAPES  # noqa: E402
from moe_kernels.graph_timing import capture_cuda_graph, graph_replay_ms  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
H200 = {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12, "bytes_per_s": 4.8e12}  # dense peaks; fp32 = TF32
GRAPH_CALLS, GRAPH_REPLAYS, PROFILE_CALLS = 20, 30, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Shape:
    """One MoE conv layer: C_in input channels, expert width w, E experts, top-k, square input."""

    name: str
    c_in: int
    width: int
    size: int
    experts: int = 2
    top_k: int = 1
    kernel: int = 3


SHAPES = {name: Shape(name, c_in, width, size) for name, (c_in, width, size) in TUNE_SHAPES.items()}  # E = 2, k = 1
QUICK_SHAPE = Shape("quick", 8, 4, 8, experts=3)


def _routing(batch: int, shape: Shape, device) -> torch.Tensor:
    """(B, k) balanced random routing: expert e gets B*k/E slots (up to rounding), k distinct per sample."""
    g = torch.Generator().manual_seed(batch)
    first = torch.randperm(batch, generator=g) % shape.experts
    return ((first[:, None] + torch.arange(shape.top_k)[None, :]) % shape.experts).to(device)


def _tensors(shape: Shape, batch: int, device, dtype, channels_last: bool) -> dict:
    """The inputs every candidate shares (fp64 masters, so the fp32 reference sees the same values)."""
    g = torch.Generator().manual_seed(0)
    rows, active = shape.experts * shape.width, shape.top_k * shape.width
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    master = {
        "x": torch.randn(batch, shape.c_in, shape.size, shape.size, generator=g, dtype=torch.float64),
        "weight": torch.randn(rows, shape.c_in, shape.kernel, shape.kernel, generator=g, dtype=torch.float64) * 0.05,
        "bias": torch.randn(rows, generator=g, dtype=torch.float64) * 0.1,
        "grad_out": torch.randn(batch, active, shape.size, shape.size, generator=g, dtype=torch.float64),
    }
    t = {k: v.to(device, dtype) for k, v in master.items()}
    t["x"] = t["x"].contiguous(memory_format=fmt)
    t["weight"] = t["weight"].contiguous(memory_format=fmt)
    t["grad_out"] = t["grad_out"].contiguous(memory_format=fmt)
    t["expert_idx"] = _routing(batch, shape, device)
    t["gate"] = torch.ones(batch, shape.top_k, device=device, dtype=dtype)
    t["master"] = master
    return t


def _candidates(shape: Shape, t: dict, mode: str, backends: list[str]) -> dict:
    """name -> zero-argument callable: one forward (no_grad) or forward + autograd.grad."""
    train = mode == "fwd+bwd"
    x, weight, bias, gate, expert_idx = t["x"], t["weight"], t["bias"], t["gate"], t["expert_idx"]
    pad, active, rows = shape.kernel // 2, shape.top_k * shape.width, shape.experts * shape.width
    slim_w, slim_b = weight[:active].detach(), bias[:active].detach()
    mask = torch.zeros(x.shape[0], shape.experts, shape.width, device=x.device, dtype=x.dtype)
    mask.scatter_(1, expert_idx[:, :, None].expand(-1, -1, shape.width), 1.0)
    mask = mask.reshape(x.shape[0], rows, 1, 1)
    grad_full = torch.zeros(x.shape[0], rows, *t["grad_out"].shape[2:], device=x.device, dtype=x.dtype)
    gate_col = gate.reshape(-1, shape.top_k, 1).expand(-1, -1, shape.width).reshape(x.shape[0], active, 1, 1)
    leaves = [v.detach().requires_grad_(train) for v in (x, weight, bias, slim_w, slim_b, gate)]
    xl, wl, bl, swl, sbl, gl = leaves

    fns = {
        "slim": (lambda: F.conv2d(xl, swl, sbl, 1, pad), (xl, swl, sbl), t["grad_out"]),
        "slim+epilogue": (
            lambda: F.conv2d(xl, swl, None, 1, pad).add_(sbl[:, None, None]).mul_(gate_col),
            (xl, swl, sbl),
            t["grad_out"],
        ),
        "masked": (lambda: F.conv2d(xl, wl, bl, 1, pad) * mask, (xl, wl, bl), grad_full),
    }
    for name in backends:
        fns[name] = (
            lambda name=name: sparse_moe_conv2d(
                xl, wl, expert_idx, shape.experts, gl if train else None, bl, 1, pad, backend=name
            ),
            (xl, wl, bl, gl),
            t["grad_out"],
        )

    def wrap(fn, inputs, grad):
        if not train:

            def call():
                with torch.no_grad():
                    return fn()

            return call
        return lambda: torch.autograd.grad(fn(), inputs, grad, allow_unused=True)

    return {name: wrap(*spec) for name, spec in fns.items()}


def _max_error(shape: Shape, t: dict, dtype, backends: list[str]) -> dict:
    """Max abs error of each candidate's forward output against the fp32 reference on the same inputs."""
    m = {k: v.to(t["x"].device, torch.float32) for k, v in t["master"].items()}
    pad, active = shape.kernel // 2, shape.top_k * shape.width
    ref = sparse_moe_conv2d(
        m["x"], m["weight"], t["expert_idx"], shape.experts, None, m["bias"], 1, pad, backend="reference"
    )
    errors = {}
    for name in ["slim", *backends]:
        with torch.no_grad():
            if name == "slim":  # the slim conv is the sparse op exactly when every sample picks expert 0
                out = F.conv2d(t["x"], t["weight"][:active], t["bias"][:active], 1, pad)
                want = F.conv2d(m["x"], m["weight"][:active], m["bias"][:active], 1, pad)
            else:
                out = sparse_moe_conv2d(
                    t["x"], t["weight"], t["expert_idx"], shape.experts, None, t["bias"], 1, pad, backend=name
                )
                want = ref
        errors[name] = float((out.float() - want).abs().max()) if out.numel() else 0.0
    return errors


def _graph_ms(fn) -> tuple[float | None, str | None]:
    """Device ms per call from a CUDA graph of GRAPH_CALLS calls replayed GRAPH_REPLAYS times (median / calls)."""
    try:
        graph = capture_cuda_graph(fn, GRAPH_CALLS)
    except Exception as err:  # a host read inside the candidate makes capture fail
        return None, f"{type(err).__name__}: {str(err)[:200]}"
    return graph_replay_ms(graph, GRAPH_CALLS, GRAPH_REPLAYS), None


def _profile_counts(fn, device) -> dict:
    """Kernels, device-to-host copies and synchronisations (or host reads on CPU) per call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_CALLS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = d2h = syncs = host_reads = 0
    for ev in prof.events():
        name = ev.name
        if device.type == "cuda" and ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += "Memcpy" not in name and "Memset" not in name
            d2h += "Memcpy DtoH" in name
        syncs += name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
        host_reads += name in ("aten::_local_scalar_dense", "aten::nonzero")
    n = PROFILE_CALLS
    return {"kernels": kernels / n, "d2h_copies": d2h / n, "syncs": syncs / n, "host_reads": host_reads / n}


def _roofline_ms(shape: Shape, batch: int, dtype: str) -> float:
    """Lower bound of the op's time on an H200: max(FLOPs / peak, bytes / bandwidth), in ms."""
    active = shape.top_k * shape.width
    flops = 2 * batch * active * shape.c_in * shape.kernel**2 * shape.size**2
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    nbytes = elem * (
        batch * shape.c_in * shape.size**2 + active * shape.c_in * shape.kernel**2 + batch * active * shape.size**2
    )
    return max(flops / H200[dtype], nbytes / H200["bytes_per_s"]) * 1e3


def _backends(device) -> list[str]:
    present = moe_kernels.available_backends()
    names = ["reference", "slices", "cpu"] if device.type == "cpu" else ["reference", "slices", "triton", "cuda"]
    return [n for n in names if n in present]


def versions() -> dict:
    """commit (with a +dirty mark), torch/triton/CUDA versions."""

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dirty = git("status", "--porcelain", "--", "moe_kernels", "csrc", "benchmarks/bench_op.py", "setup.py")
    return {
        "commit": git("rev-parse", "HEAD") + ("+dirty" if dirty else ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def run_benchmark(args) -> dict:
    """Runs every (shape, batch, pass) configuration in this process; returns the JSON-able document."""
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    shapes = [QUICK_SHAPE] if args.quick else [SHAPES[s] for s in args.shapes]
    batches = args.batch or ([2, 5] if args.quick else [256, 32])
    backends = _backends(device)
    rows = []
    for shape, batch in tqdm([(s, b) for s in shapes for b in batches], desc="bench_op", disable=args.quiet):
        t = _tensors(shape, batch, device, DTYPES[args.dtype], channels_last=gpu)
        errors = _max_error(shape, t, DTYPES[args.dtype], backends)
        bound = _roofline_ms(shape, batch, args.dtype)
        for mode in args.modes:
            fns = _candidates(shape, t, mode, backends)
            eager = time_interleaved(fns, device, reps=args.reps, warmup=args.warmup)
            for name, fn in fns.items():
                graph_ms, graph_error = _graph_ms(fn) if gpu else (None, "CPU: no CUDA graph")
                ms = graph_ms if graph_ms is not None else eager[name]
                rows.append(
                    {
                        **asdict(shape),
                        "shape": shape.name,
                        "batch": batch,
                        "mode": mode,
                        "method": name,
                        "ms": ms,
                        "timing": "cuda_graph" if graph_ms is not None else "eager",
                        "eager_ms": eager[name],
                        "graph_ms": graph_ms,
                        "graph_error": graph_error,
                        "max_err_vs_fp32": errors.get(name),
                        "roofline_fwd_ms": bound,
                        **_profile_counts(fn, device),
                    }
                )
    for r in rows:
        slim = next(
            s
            for s in rows
            if s["method"] == "slim" and (s["shape"], s["batch"], s["mode"]) == (r["shape"], r["batch"], r["mode"])
        )
        r["vs_slim"] = r["ms"] / slim["ms"]
        r["roofline_pct"] = 100 * r["roofline_fwd_ms"] / r["ms"] if r["mode"] == "fwd" else None
    return {
        "benchmark": "sparse_moe_conv2d op, v2",
        "device": device_description(device),
        "device_slug": device_slug(device),
        "dtype": args.dtype,
        "tf32": gpu and args.dtype == "fp32",
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "warmup": args.warmup,
        "backends": backends,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **versions(),
        "notes": "ms = CUDA-graph device time per call when capturable, else eager median; eager_ms = median "
        "single-call latency; roofline_pct (fwd only) against the H200 peaks in H200; max_err_vs_fp32 of the "
        "forward output; counts per call from torch.profiler",
        "rows": rows,
    }


def aggregate_processes(docs: list[dict]) -> dict:
    """Merges runs of separate processes: per row ms_min / ms (median) / ms_max over the processes."""
    doc = dict(docs[0])
    doc["processes"] = len(docs)
    merged = []
    for i, row in enumerate(docs[0]["rows"]):
        values = sorted(d["rows"][i]["ms"] for d in docs)
        ratios = sorted(d["rows"][i]["vs_slim"] for d in docs)
        merged.append(
            {
                **row,
                "ms_min": values[0],
                "ms": statistics.median(values),
                "ms_max": values[-1],
                "vs_slim": statistics.median(ratios),
            }
        )
    doc["rows"] = merged
    return doc


def markdown_table(doc: dict) -> str:
    """One line per (shape, batch, pass): every candidate's ms and its ratio to slim."""
    methods = ["slim", "slim+epilogue", "masked", *doc["backends"]]
    lines = [
        f"Device: {doc['device']}; dtype {doc['dtype']} (TF32: {doc['tf32']}); commit {doc['commit']}; "
        f"processes: {doc.get('processes', 1)}. Cells: ms (ratio to slim)"
        + ("; ms = min/median/max over processes." if doc.get("processes", 1) > 1 else "."),
        "",
        "| shape (C_in, w, E, HxW) | B | pass | " + " | ".join(methods) + " |",
        "|" + "---|" * (3 + len(methods)),
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["shape"], r["batch"], r["mode"]), {})[r["method"]] = r
    for (name, batch, mode), by in groups.items():
        r0 = by["slim"]
        label = f"{name} ({r0['c_in']}, {r0['width']}, {r0['experts']}, {r0['size']}x{r0['size']})"
        cells = []
        for m in methods:
            r = by.get(m)
            if r is None:
                continue
            ms = f"{r['ms_min']:.3f}/{r['ms']:.3f}/{r['ms_max']:.3f}" if "ms_min" in r else f"{r['ms']:.3f}"
            cells.append(f"{ms} ({r['vs_slim']:.2f}x)")
        lines.append(f"| {label} | {batch} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def op_claims(docs: list[dict]) -> list[dict]:
    """The op.* claims of issue 10 from bench_op JSON documents (B = 256, worst of the shapes)."""
    claims = []
    for doc in docs:
        precision = "tf32" if doc["tf32"] else doc["dtype"]
        for mode, tag in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
            for backend in doc["backends"]:
                ratios = [
                    r["vs_slim"]
                    for r in doc["rows"]
                    if r["batch"] == 256 and r["mode"] == mode and r["method"] == backend
                ]
                if ratios:
                    claims.append(
                        {
                            "id": f"op.{tag}.{precision}.b256.worst_vs_slim.{backend}",
                            "value": max(ratios),
                            "target": None,
                            "source": doc.get("source", "bench_op"),
                        }
                    )
            best = [c for c in claims if c["id"].startswith(f"op.{tag}.{precision}.b256.worst_vs_slim.")]
            if best:
                auto = min(best, key=lambda c: c["value"])
                claims.append(
                    {
                        **auto,
                        "id": f"op.{tag}.{precision}.b256.worst_vs_slim",
                        "note": f"best backend: {auto['id'].rsplit('.', 1)[1]}",
                    }
                )
        syncs = [r["d2h_copies"] + r["syncs"] for r in doc["rows"] if r["method"] in ("triton", "cuda")]
        if syncs:
            claims.append(
                {
                    "id": f"op.host_syncs_per_call.{precision}",
                    "value": max(syncs),
                    "target": 0,
                    "source": doc.get("source", "bench_op"),
                }
            )
    return claims


def write_claims(out_dir: str, claims: list[dict], device: str, commit: str | None = None) -> str:
    """Writes ``<out_dir>/claims.json`` = {"commit", "device", "claims": [{"id", "value", "target", "source"}]}."""
    for c in claims:
        missing = {"id", "value", "target", "source"} - set(c)
        if missing:
            raise ValueError(f"claim {c.get('id')!r} lacks {sorted(missing)}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "claims.json")
    with open(path, "w") as f:
        json.dump({"commit": commit or versions()["commit"], "device": device, "claims": claims}, f, indent=1)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 256 32)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default 2; 0 = torch default)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--processes", type=int, default=1, help="separate processes (CPU: report min/median/max)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (for tests)")
    p.add_argument("--out-dir", help="default: benchmarks/results/<device-slug>")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # child processes
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 3), 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_op: --device cuda but no CUDA GPU is available")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.processes > 1:
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])]
        docs = []
        for _ in tqdm(range(args.processes), desc="processes", disable=args.quiet):
            cmd = [sys.executable, os.path.abspath(__file__), *argv_child, "--processes", "1", "--json-only", "--quiet"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            docs.append(json.loads(out[out.index("{") :]))
        doc = aggregate_processes(docs)
    else:
        doc = run_benchmark(args)
        if args.json_only:
            print(json.dumps(doc))
            return doc
    out_dir = args.out_dir or os.path.join(ROOT, "benchmarks", "results", doc["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(doc)
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    with open(os.path.join(out_dir, f"op_bench{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, f"op_bench{suffix}.md"), "w") as f:
        f.write(f"# sparse_moe_conv2d op benchmark v2 ({doc['device_slug']}, {args.dtype})\n\n" + table)
    print(table)
    return doc


if __name__ == "__main__":
    main()
