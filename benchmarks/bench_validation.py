"""Validate a generated 1,000,000-line batch input: peak RSS (target <= 300 MB) and lines/s.

The validation runs in a fresh subprocess so its peak RSS is its own. Side by side, the peer is the
obvious approach (read the whole file and json.loads every line into a list), for scale.

Usage: python benchmarks/bench_validation.py [--lines 1000000] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VALIDATE = """
import sys, time
from vbatch_pipelines.batch.validation import validate_batch_file
started = time.monotonic()
report = validate_batch_file(sys.argv[1], endpoint="/v1/chat/completions", resolve_model=lambda n: "m",
                             output=sys.argv[2])
assert report.ok, report.errors[:3]
print(report.total, time.monotonic() - started)
"""

PEER = """
import json, sys, time
started = time.monotonic()
with open(sys.argv[1]) as f:
    rows = [json.loads(line) for line in f]
ids = {r["custom_id"] for r in rows}
assert len(ids) == len(rows)
print(len(rows), time.monotonic() - started)
"""


def run(code: str, *argv: str) -> tuple[int, float, float]:
    """(lines, seconds, peak RSS in MB) of a fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout.split()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak >= before
    return int(out[0]), float(out[1]), peak / 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vbatch-validate-"))
    source = work / "input.jsonl"
    with open(source, "w") as f:
        for i in range(args.lines):
            f.write(json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"max_tokens": 64, "temperature": 0.2, "messages": [
                                    {"role": "system", "content": "You are a careful assistant."},
                                    {"role": "user", "content": f"Summarize item {i} in one sentence."}]}})
                    + "\n")
    size_mb = source.stat().st_size / 1e6
    print(f"input: {args.lines} lines, {size_mb:.0f} MB")
    # ru_maxrss of children is the max over all children so far: run vbatch first, then the peer.
    lines, seconds, peak = run(VALIDATE, str(source), str(work / "input.parquet"))
    print(f"vbatch validate: {lines / seconds:,.0f} lines/s ({seconds:.1f}s), peak RSS {peak:.0f} MB "
          f"(target <= 300 MB); Parquet {(work / 'input.parquet').stat().st_size / 1e6:.0f} MB")
    if not args.no_peer:
        lines, seconds, peer_peak = run(PEER, str(source))
        print(f"peer (json.loads all lines into a list): {lines / seconds:,.0f} lines/s ({seconds:.1f}s), "
              f"peak RSS {peer_peak:.0f} MB -> vbatch uses {peak / peer_peak:.2f}x the peer's memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
