"""What an idle `vbatch up` holds in memory, process by process (issue 28, "a lean supervisor"): a real `vbatch up`
on a fresh home (curation off, the default CPU vLLM engine with the tiny model, built on first use), left idle
for ``--idle`` seconds after its banner; then the RSS of each of its processes, named by role from its command
line (the supervisor, its start-up child if still there, the API and its workers, the Dagster webserver and
daemon, their code servers and run workers, the engine's server and engine core), and the total.

Target: the supervisor (`vbatch up` itself, which lives as long as the platform) holds <= 100 MB. It held 481 MB
when it built the tiny model itself (torch, transformers) and opened Dagster's instance; exit code 1 when the
target is not met. The total counts shared pages once per process (RSS), as `ps` does.

Peer (``--peer REV``): the same with that revision's `vbatch up` (from a git worktree), before this one.

    .venv/bin/python benchmarks/bench_idle_rss.py [--idle 10] [--peer REV]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import ROOT, Stack, engine_pid, load_average, worktree  # noqa: E402

SUPERVISOR_TARGET_MB = 100.0
MB = 2**20


def role_of(cmdline: str, parent_role: str | None) -> str:
    """A process's role in the platform, from its command line (and its parent's role)."""
    if "vbatch_pipelines.cli up" in cmdline:
        return "supervisor (vbatch up)"
    if "startup_child_main" in cmdline:
        return "start-up child"
    if "dagster-webserver" in cmdline:
        return "dagster-webserver"
    if "dagster-daemon" in cmdline:
        return "dagster-daemon"
    if "dagster api grpc" in cmdline:
        return f"code server of the {parent_role}"
    if "vbatch_pipelines.dagster_ext.run_launcher" in cmdline:
        return f"run worker of the {parent_role}"
    if "uvicorn" in cmdline and "api.main" in cmdline:
        return "API (uvicorn)"
    if "multiprocessing.resource_tracker" in cmdline:
        return f"resource tracker of the {parent_role}"
    if "multiprocessing.spawn" in cmdline:
        return "API worker" if parent_role == "API (uvicorn)" else f"worker of the {parent_role}"
    if "vllm.entrypoints" in cmdline:
        return "engine (vLLM server)"
    if "VLLM::EngineCore" in cmdline or "EngineCore" in cmdline:
        return "engine core"
    return f"other: {cmdline[:60]}"


def processes(stack: Stack) -> list[tuple[str, psutil.Process]]:
    """Every process of the platform with its role: the supervisor's tree and the engine's (detached: not in it)."""
    found: list[tuple[str, psutil.Process]] = []

    def walk(process: psutil.Process, parent_role: str | None) -> None:
        try:
            role = role_of(" ".join(process.cmdline()), parent_role)
            children = process.children()
        except psutil.Error:
            return
        found.append((role, process))
        for child in children:
            walk(child, role)

    walk(psutil.Process(stack.process.pid), None)
    seen = {process.pid for _, process in found}
    try:
        engine = psutil.Process(engine_pid(stack))
    except (StopIteration, psutil.Error):
        raise SystemExit("no vLLM engine runs: this benchmark needs the CPU vLLM env (`make engine`)") from None
    if engine.pid not in seen:
        walk(engine, None)
    return found


def torch_loaded(pid: int) -> bool:
    """Whether a process has torch's library mapped (it imported torch)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def measure(root: Path, idle_s: float) -> tuple[list[tuple[str, int, int]], bool]:
    """`vbatch up` from ``root``, idle ``idle_s`` after its banner: (role, pid, RSS bytes) of each process, and
    whether the supervisor loaded torch."""
    started = time.monotonic()
    stack = Stack(root=root)
    try:
        print(f"  up in {time.monotonic() - started:.0f}s; idle {idle_s:.0f}s ...", flush=True)
        time.sleep(idle_s)
        rows = []
        for role, process in processes(stack):
            try:
                rows.append((role, process.pid, process.memory_info().rss))
            except psutil.Error:
                continue
        return rows, torch_loaded(stack.process.pid)
    finally:
        stack.stop()


def report(label: str, rows: list[tuple[str, int, int]], torch: bool) -> float:
    """Print one side's table; returns the supervisor's RSS in MB."""
    print(f"\n{label}")
    print(f"  {'process':<46} {'pid':>8} {'RSS':>9}")
    for role, pid, rss in rows:
        print(f"  {role:<46} {pid:>8} {rss / MB:>6.0f} MB")
    print(f"  {'total':<46} {'':>8} {sum(rss for _, _, rss in rows) / MB:>6.0f} MB")
    supervisor = next(rss for role, _, rss in rows if role.startswith("supervisor")) / MB
    print(f"  supervisor {supervisor:.0f} MB (target <= {SUPERVISOR_TARGET_MB:.0f} MB: "
          f"{'met' if supervisor <= SUPERVISOR_TARGET_MB else 'not met'}); torch loaded in it: "
          f"{'yes' if torch else 'no'}")
    return supervisor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle after the banner before measuring")
    parser.add_argument("--peer", default=None, help="also measure this git revision's `vbatch up`, first")
    args = parser.parse_args()
    print(f"Idle RSS of `vbatch up` (curation off, CPU vLLM engine, tiny model); load {load_average()}", flush=True)
    if args.peer:
        print(f"peer {args.peer}:", flush=True)
        report(f"peer {args.peer}", *measure(worktree(args.peer), args.idle))
    print("this checkout:", flush=True)
    supervisor = report("this checkout", *measure(ROOT, args.idle))
    return 0 if supervisor <= SUPERVISOR_TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
