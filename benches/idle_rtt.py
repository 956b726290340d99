#!/usr/bin/env python3
"""The floor under light-load latency on this machine: a one-byte TCP round trip between two
processes on loopback, paced like a light load (50 ms between pings, so both sides sleep in
between and are woken for each one) and back to back (both stay awake).

  benches/idle_rtt.py

Prints p50 and p99 of each, in µs (Python's own cost is a few µs of each round trip).
"""
import socket, time, os, sys, statistics
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
if os.fork() == 0:
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: os._exit(0)
        c.sendall(d)
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for gap in (0.05, 0.0):
    rtts = []
    for i in range(400):
        t = time.perf_counter(); s.sendall(b"x"); s.recv(64); rtts.append((time.perf_counter() - t) * 1e6)
        if gap: time.sleep(gap)
    rtts.sort()
    print(f"gap {gap*1000:.0f} ms: RTT p50 {rtts[len(rtts)//2]:.0f} µs, p99 {rtts[int(len(rtts)*0.99)]:.0f} µs")
s.close()
