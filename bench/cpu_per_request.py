#!/usr/bin/env python3
"""CPU per request of a running proxy: its utime and stime (from
/proc/PID/stat) across a wrk run, divided by the requests served. Steadier
than req/s on a noisy VM. Run the proxy pinned to one core first, e.g.

    TOKIO_WORKER_THREADS=1 taskset -c 0 target/release/sluice run --config X &
    python3 bench/cpu_per_request.py --pid $! --url http://127.0.0.1:8080/v1/chat/completions

wrk (pinned to --load-cpu) sends bench/chat.lua's request; each run prints
req/s and µs of user and system CPU per request.
"""
import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_ticks(pid):
    # Fields after the command name, which may itself hold spaces.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, required=True, help="the proxy's process id")
    ap.add_argument("--url", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--load-cpu", default="1", help="core for wrk (not the proxy's)")
    args = ap.parse_args()
    tick = os.sysconf("SC_CLK_TCK")
    for _ in range(args.runs):
        u0, s0 = cpu_ticks(args.pid)
        out = subprocess.run(
            ["taskset", "-c", args.load_cpu, "wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s",
             "-s", os.path.join(HERE, "chat.lua"), args.url],
            capture_output=True, text=True, check=True,
        ).stdout
        u1, s1 = cpu_ticks(args.pid)
        found = re.search(r"RESULT rps=([\d.]+) .*requests=(\d+)", out)
        if not found:
            sys.exit(f"no RESULT line from wrk:\n{out}")
        rps, n = float(found.group(1)), int(found.group(2))
        user = (u1 - u0) / tick / n * 1e6
        system = (s1 - s0) / tick / n * 1e6
        print(f"{rps:,.0f} req/s  user {user:.2f} µs  sys {system:.2f} µs per request")


if __name__ == "__main__":
    main()
