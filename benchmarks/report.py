"""Markdown tables from a pytest-benchmark JSON of the fastdiv benchmarks.

    python benchmarks/report.py bench.json                 # one row per (loss, size, dtype, impl)
    python benchmarks/report.py bench.json --layout wide   # one row per (loss, size, dtype)
    python benchmarks/report.py bench.json -o table.md

Times are the median over rounds. GB/s is the minimal memory traffic divided by the median time:
3 x bytes(X) per forward + backward (read X, read X again, write dX), 1 x bytes(X) for the
forward-only concentration_stats. "% copy" compares that with the copy bandwidth measured at the
start of the same session (torch ``copy_``, read+write bytes/s). Speedups are the eager (or
compiled) median over the fused median of the same case.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

IMPL_ORDER = ("fused", "eager", "compiled")
SIZE_ORDER = ("mnist", "cifar10", "stl10", "cifar10-n20", "large")
OP_ORDER = ("dpp_loss", "mean_cosine_loss", "kappa_loss", "max_cosine_loss", "smoothmax_cosine_loss",
            "gal_loss", "mean_penalty", "variance_penalty", "sparsity_penalty", "concentration_stats")


def _rank(order, value):
    return (order.index(value), "") if value in order else (len(order), str(value))


def load(paths: list[str]) -> tuple[dict, dict, list[dict]]:
    """(machine_info, commit_info, rows) merged from one or more JSON files (header from the first)."""
    machine, commit, rows = {}, {}, []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        machine = machine or data.get("machine_info", {})
        commit = commit or data.get("commit_info", {})
        machine.setdefault("_datetime", data.get("datetime"))
        for bench in data.get("benchmarks", []):
            info, stats = bench.get("extra_info", {}), bench.get("stats", {})
            if "op" not in info or "traffic_bytes" not in info or not stats.get("median"):
                continue  # not a kernel row (the EOT-PGD and training benchmarks report their own), or untimed
            median = stats["median"]
            traffic = info["traffic_bytes"]
            copy = info.get("copy_GBps")
            gbps = traffic / median / 1e9
            rows.append({
                "op": info["op"], "size": info["size"], "B": info["B"], "n": info["n"], "D": info["D"],
                "dtype": info["dtype"], "impl": info["impl"], "pass": info.get("pass", "fwd+bwd"),
                "median": median, "rounds": stats.get("rounds"), "iqr": stats.get("iqr"),
                "GBps": gbps, "pct_copy": 100.0 * gbps / copy if copy else None,
                "quick": info.get("quick", False), "compile": info.get("compile", ""),
            })
    rows.sort(key=lambda r: (_rank(OP_ORDER, r["op"]), _rank(SIZE_ORDER, r["size"]), r["dtype"] != "fp32",
                             r["dtype"], _rank(IMPL_ORDER, r["impl"])))
    return machine, commit, rows


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.1f}×" if ratio < 100 else f"{ratio:.0f}×"


def _pct(p: float | None) -> str:
    return "—" if p is None else f"{p:.0f}%" if p >= 10 else f"{p:.1f}%"


def _size(r: dict) -> str:
    return f"{r['size']} ({r['B']}×{r['n']}×{r['D']})"


def _loss(r: dict) -> str:
    return r["op"] + (" (fwd)" if r["pass"] == "fwd" else "")


def header(machine: dict, commit: dict, rows: list[dict]) -> list[str]:
    fd = machine.get("fastdiv", {})
    lines = ["## fastdiv CPU benchmarks", ""]
    if any(r["quick"] for r in rows):
        lines += ["> **QUICK mode** (FASTDIV_BENCH_QUICK=1): batch sizes shrunk 32×; a smoke test, not results.", ""]
    cpus = f", {fd['logical_cpus']} logical CPUs" if fd.get("logical_cpus") else ""
    isa = f", ATen ISA {fd['cpu_capability']}" if fd.get("cpu_capability") else ""
    omp = f" (OMP_NUM_THREADS={fd['OMP_NUM_THREADS']})" if fd.get("OMP_NUM_THREADS") else ""
    rev = commit.get("id")
    rev = f"{rev[:12]}{' (dirty tree)' if commit.get('dirty') else ''}" if rev else "unknown"
    items = [
        ("device", f"{fd.get('cpu_model', machine.get('cpu', {}).get('brand_raw', 'unknown'))}{cpus}{isa}"),
        ("threads", f"{fd.get('threads', '?')} (torch.get_num_threads){omp}"),
        ("torch", fd.get("torch", "?")),
        ("python", machine.get("python_version", "?")),
        ("fastdiv", f"{fd.get('fastdiv', '?')}, commit {rev}"),
    ]
    kernels = (fd.get("fastdiv_info") or {}).get("cpu_kernels")
    if kernels:
        forced = (fd.get("bench_env") or {}).get("FASTDIV_CPU_CAPABILITY")
        items.append(("fastdiv CPU kernels", f"{kernels}" + (f" (forced: FASTDIV_CPU_CAPABILITY={forced})" if forced
                                                            else " (the best this CPU supports)")))
    if fd.get("copy_GBps"):
        items.append(("copy bandwidth", (
            f"{fd['copy_GBps']:.1f} GB/s: torch `copy_` of a {fd['copy_buffer_MiB']} MiB fp32 buffer, best of "
            f"{fd['copy_repeats']}, counted as read + write (2 × bytes / time)")))
    if machine.get("_datetime"):
        items.append(("date", machine["_datetime"]))
    if fd.get("command"):
        env = " ".join(f"{k}={v}" for k, v in fd.get("bench_env", {}).items() if k.startswith("FASTDIV_BENCH"))
        items.append(("command", f"`{(env + ' ') if env else ''}{fd['command']}`"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in items] + [""]
    lines += [
        "Median time over rounds of `grads.grad = None; loss = f(grads); loss.backward()` "
        "(concentration_stats: forward only). *fused* = `backend='cpu'`, *eager* = `backend='torch'` "
        "(fastdiv/reference.py), *compiled* = `torch.compile` of the reference. GB/s = minimal traffic / "
        "median: 3 × bytes(X) for forward + backward, 1 × bytes(X) for forward only, (n + 3) × bytes(x) for an "
        "EOT step (+ the momentum buffer read and written); % copy = GB/s over the "
        "copy bandwidth above (same read + write convention). Speedup = other impl's median / fused median.",
        "",
    ]
    graph_breaks = sorted({r["op"] for r in rows if "graph breaks" in r["compile"]})
    if graph_breaks:
        lines += [f"`fullgraph=True` failed for {', '.join(graph_breaks)} (data-dependent shapes); "
                  "their *compiled* rows use `torch.compile` with graph breaks.", ""]
    return lines


def _cases(rows: list[dict]):
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["size"], r["dtype"])][r["impl"]] = r
    return groups


def long_table(rows: list[dict]) -> list[str]:
    groups = _cases(rows)
    out = ["| op | size (B×n×D) | dtype | impl | median ms | GB/s (floor) | % copy "
           "| fused vs eager | fused vs compiled |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = groups[(r["op"], r["size"], r["dtype"])]

        def vs(other):  # speedups only on the fused row
            return g[other]["median"] / r["median"] if r["impl"] == "fused" and other in g else None
        out.append(f"| {_loss(r)} | {_size(r)} | {r['dtype']} | {r['impl']} | {_ms(r['median'])} | "
                   f"{r['GBps']:.2f} | {_pct(r['pct_copy'])} | {_x(vs('eager'))} | {_x(vs('compiled'))} |")
    return out


def wide_table(rows: list[dict]) -> list[str]:
    out = ["| op | size (B×n×D) | dtype | fused ms | eager ms | compiled ms | fused GB/s (floor) | fused % copy "
           "| fused vs eager | fused vs compiled |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    groups = _cases(rows)
    for r in rows:
        key = (r["op"], r["size"], r["dtype"])
        if key in seen:
            continue
        seen.add(key)
        g = groups[key]
        ms = lambda impl: _ms(g[impl]["median"]) if impl in g else "—"  # noqa: E731
        f = g.get("fused")
        vs = lambda other: g[other]["median"] / f["median"] if f and other in g else None  # noqa: E731
        fused_bw = f"{f['GBps']:.2f} | {_pct(f['pct_copy'])}" if f else "— | —"
        out.append(f"| {_loss(r)} | {_size(r)} | {r['dtype']} | {ms('fused')} | {ms('eager')} | {ms('compiled')} | "
                   f"{fused_bw} | {_x(vs('eager'))} | {_x(vs('compiled'))} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json=FILE)")
    parser.add_argument("--layout", choices=("long", "wide"), default="long",
                        help="long: one row per implementation (default); wide: one row per case")
    parser.add_argument("-o", "--output", help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    machine, commit, rows = load(args.json)
    if not rows:
        print("no timed fastdiv benchmarks in " + ", ".join(args.json), file=sys.stderr)
        return 1
    table = long_table(rows) if args.layout == "long" else wide_table(rows)
    text = "\n".join(header(machine, commit, rows) + table) + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
