"""Run `liveportrait-triton animate` many times against a running server and record every outcome (a stress run,
not a test): each run's exit status, seconds, output frames and its error output's first line, as CSV, plus a
summary line. Several workers run at once, which also loads the machine.

    python -m liveportrait_triton.benchmarks.animate_loop --server 127.0.0.1:8001 --source S.jpg --driving D.mp4 \
        --runs 200 --workers 2 --max-frames 8 --out results.csv
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(number: int, args, folder: Path) -> dict:
    output = folder / f"run{number}.mp4"
    command = [sys.executable, "-m", "liveportrait_triton", "animate", "--server", args.server, "--source",
               args.source, "--driving", args.driving, "--output", str(output), "--quiet"]
    if args.max_frames:
        command += ["--max-frames", str(args.max_frames)]
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - began
    frames = ""
    if done.returncode == 0:
        from ..client import media
        frames = media.probe_video(output)["frames"]
        output.unlink()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"run": number, "status": done.returncode, "seconds": f"{seconds:.2f}", "frames": frames,
            "stderr_lines": len(lines), "first_stderr_line": lines[0][:300] if lines else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--driving", required=True)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-frames", type=int, default=0)
    parser.add_argument("--out", required=True, help="CSV file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="animate-loop-") as folder, \
            concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(one_run, n, args, Path(folder)) for n in range(args.runs)]
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["run", "status", "seconds", "frames", "stderr_lines",
                                                        "first_stderr_line"])
            writer.writeheader()
            for future in concurrent.futures.as_completed(futures):
                row = future.result()
                rows.append(row)
                writer.writerow(row)
                handle.flush()
    failed = [r for r in rows if r["status"] != 0]
    noisy = [r for r in rows if r["status"] == 0 and r["stderr_lines"]]
    frames = {r["frames"] for r in rows if r["status"] == 0}
    print(f"{len(rows)} runs: {len(rows) - len(failed)} succeeded (output frames {sorted(frames)}), {len(failed)} "
          f"failed, {len(noisy)} succeeded with stderr output")
    for row in failed[:10]:
        print(f"  run {row['run']}: status {row['status']}: {row['first_stderr_line']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
