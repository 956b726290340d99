"""A hostile subscriber against a running broker's PUB socket: the broker's rate, CPU per
message and memory before and after one raw ZMTP peer sends SUBSCRIPTIONS distinct
subscriptions as fast as the kernel takes them. Run by benches/subscription_flood.sh.

    python3 benches/subscription_flood.py PULL_ADDR PUB_ADDR BROKER_PID [SUBSCRIPTIONS]

Needs pyzmq (libzmq) for the well-behaved PUSH and SUB; the hostile peer is a plain socket.
"""
import os
import socket
import sys
import time

import zmq

pull, pub, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
subscriptions = int(sys.argv[4]) if len(sys.argv) > 4 else 2_000_000
ticks = os.sysconf("SC_CLK_TCK")


def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


context = zmq.Context()
push = context.socket(zmq.PUSH)
push.connect("tcp://" + pull)
sub = context.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.RCVTIMEO, 10_000)
sub.connect("tcp://" + pub)
time.sleep(0.5)


def measure(label, count):
    """Sends `count` messages through the broker and waits for all of them on SUB."""
    cpu, start = cpu_seconds(), time.time()
    for i in range(count):
        push.send(b'{"from":"flood","text":"%d"}' % i)
    try:
        for _ in range(count):
            sub.recv()
    except zmq.Again:
        print(f"{label}: messages lost or stuck (10 s without one)")
        return
    elapsed = time.time() - start
    print(
        f"{label}: {count / elapsed:,.0f} msg/s, broker CPU "
        f"{(cpu_seconds() - cpu) / count * 1e6:.1f} µs per message, RSS {rss_kib() / 1024:.1f} MiB"
    )


measure("before", 20_000)
host, port = pub.rsplit(":", 1)
hostile = socket.create_connection((host, int(port)))
greeting = (bytes([0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0]) + b"NULL".ljust(20, b"\0") + b"\0").ljust(64, b"\0")
ready = bytes([5]) + b"READY" + bytes([11]) + b"Socket-Type" + (3).to_bytes(4, "big") + b"SUB"
hostile.sendall(greeting + bytes([4, len(ready)]) + ready)
# ZMTP 3.0 subscriptions: a short frame, 1 then the prefix (here 8 digits).
chunk = b"".join(bytes([0, 9, 1]) + b"%08d" % i for i in range(100_000))
start, sent = time.time(), 0
try:
    for _ in range(max(1, subscriptions // 100_000)):
        hostile.sendall(chunk)
        sent += 100_000
    outcome = "still connected"
except OSError as error:
    outcome = f"disconnected by the broker ({error.strerror})"
print(f"hostile peer: {sent:,} subscriptions written in {time.time() - start:.1f} s, {outcome}")
time.sleep(2)
measure("after", 2_000)
