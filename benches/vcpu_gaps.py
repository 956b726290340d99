#!/usr/bin/env python3
"""How often this machine takes a CPU away from a running process, and for how long.

One process per CPU given (pinned to it) reads CLOCK_MONOTONIC in a tight loop for SECONDS and
records every gap between two reads longer than THRESHOLD µs: time the CPU was not running it
(on a virtual machine, mostly the host running something else; on any machine, interrupts and
other tasks). With `--cpus 0` one CPU spins while the other stays idle; with `--cpus 0,1` both
spin, as under a load that keeps both busy.

  benches/vcpu_gaps.py --cpus 0 --seconds 10
  benches/vcpu_gaps.py --cpus 0,1 --seconds 10

Prints one JSON object: per CPU, the gaps' count, total, longest, and their lengths by
millisecond (`"2": 5` is five gaps of 2.0–2.999 ms).
"""
import argparse
import json
import multiprocessing
import os
import time


def spin(cpu, seconds, threshold_ns, out):
    os.sched_setaffinity(0, {cpu})
    clock = time.monotonic_ns
    gaps = []
    last = clock()
    end = last + int(seconds * 1e9)
    while last < end:
        now = clock()
        if now - last > threshold_ns:
            gaps.append(now - last)
        last = now
    out.send(gaps)
    out.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default="0,1", help="CPUs to spin on, comma-separated")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threshold-us", type=float, default=500)
    args = parser.parse_args()
    cpus = [int(c) for c in args.cpus.split(",")]
    workers = []
    for cpu in cpus:
        receive, send = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(
            target=spin, args=(cpu, args.seconds, args.threshold_us * 1000, send)
        )
        process.start()
        workers.append((cpu, process, receive))
    report = {"seconds": args.seconds, "threshold_us": args.threshold_us, "cpus": {}}
    for cpu, process, receive in workers:
        gaps = receive.recv()
        process.join()
        by_ms = {}
        for gap in gaps:
            by_ms[gap // 1_000_000] = by_ms.get(gap // 1_000_000, 0) + 1
        report["cpus"][cpu] = {
            "gaps": len(gaps),
            "total_ms": round(sum(gaps) / 1e6, 2),
            "longest_ms": round(max(gaps, default=0) / 1e6, 2),
            "by_ms": {str(ms): count for ms, count in sorted(by_ms.items())},
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
