#!/usr/bin/env python3
"""A peer that asks the broker's snapshot socket for answers and never reads them.

Fills the broker's history with 1,000 messages (pyzmq PUSH), then writes REQUESTS snapshot
requests from a raw ZMTP peer (a DEALER that reads nothing) and prints the broker's resident
memory each second for ten seconds. Before zeromq patch 7 the broker queued every answer.

  target/release/temma broker -c CONFIG &     # PULL, PUB and a snapshot ROUTER on these ports
  benches/snapshot_flood.py PULL_PORT SNAPSHOT_PORT BROKER_PID [REQUESTS]

CONFIG: `zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:PULL_PORT"`, `zmq_broker_pub` any,
`zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:SNAPSHOT_PORT"`, `[broker] snapshot =
"zmq_broker_snapshot"`.
"""
import json
import socket
import struct
import sys
import time

import zmq


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def greeting():
    return (bytes([0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0]) + b"NULL".ljust(20, b"\0") + b"\0").ljust(64, b"\0")


def ready(socket_type):
    body = bytes([5]) + b"READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type))
    body += socket_type.encode()
    return bytes([0x04, len(body)]) + body


def main():
    pull, snapshot, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    requests = int(sys.argv[4]) if len(sys.argv) > 4 else 30_000
    push = zmq.Context().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{pull}")
    for i in range(1000):
        push.send(json.dumps({"from": "a", "text": "x" * 150 + str(i)}).encode())
    time.sleep(1.0)
    print(f"history of 1000 messages: RSS {rss_kib(pid)} KiB")
    peer = socket.create_connection(("127.0.0.1", snapshot))
    out = bytearray(greeting() + ready("DEALER"))
    for n in range(requests):
        body = json.dumps({"after": [], "n": n}).encode()
        out += bytes([0x00, len(body)]) + body
    peer.sendall(out)
    print(f"{requests} requests ({len(out)} bytes) sent, none of the answers read")
    for second in range(1, 11):
        time.sleep(1)
        print(f"{second:2} s: RSS {rss_kib(pid)} KiB")


if __name__ == "__main__":
    main()
