#!/usr/bin/env python3
"""An independent SSE load client, written apart from temma (Python's asyncio, standard
library only), so that no comparison depends on temma's own tool alone.

It opens SUBSCRIBERS streams on SUBSCRIBE_URL, then POSTs MESSAGES bodies to PUBLISH_URL at
RATE per second, each carrying a marker `load-<seq>-<send time in µs>`; every subscriber finds
the markers in what it reads and the tool prints one JSON object: deliveries expected and
received, duplicates, and the latency from send to receipt (p50, p99, max, in ms).

  benches/sse_reader.py --subscribe http://127.0.0.1:8090/event/fetch \
      --publish http://127.0.0.1:8090/message/broadcast --subscribers 500 --rate 10 --messages 100

Loopback only; plain HTTP/1.1; the body template takes `{seq}` and `{ts}` like temma-load's.
"""
import argparse
import asyncio
import json
import re
import time
import urllib.parse

MARKER = re.compile(rb"load-(\d+)-(\d+)")
START = time.monotonic()


def now_us():
    return int((time.monotonic() - START) * 1e6)


def target(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{url}: loopback http:// URLs only")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


async def subscriber(url, stats, ready):
    host, port, path = target(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        stats["failed"] += 1
        ready.release()
        return
    stats["connected"] += 1
    ready.release()
    seen = set()
    buffer = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buffer += chunk
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            complete, buffer = buffer[: end + 2], buffer[end + 2 :]
            received = now_us()
            for match in MARKER.finditer(complete):
                seq, sent = int(match.group(1)), int(match.group(2))
                if seq in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(seq)
                stats["received"] += 1
                stats["latencies"].append(received - sent)
    finally:
        writer.close()


async def publish(url, body_template, content_type, rate, messages, stats):
    host, port, path = target(url)
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    for seq in range(messages):
        due = started + seq / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = body_template.replace("{seq}", str(seq)).replace("{ts}", str(now_us())).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        status = head.split(b"\r\n")[0].split(b" ")[1]
        if status.startswith(b"2"):
            stats["accepted"] += 1
    writer.close()


def percentile(values, fraction):
    if not values:
        return 0
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribe", required=True)
    parser.add_argument("--publish", required=True)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--body", default="from=load&text=load-{seq}-{ts}")
    parser.add_argument("--content-type", default="application/x-www-form-urlencoded")
    parser.add_argument("--drain-secs", type=float, default=3)
    args = parser.parse_args()
    stats = {"connected": 0, "failed": 0, "received": 0, "duplicates": 0, "accepted": 0, "latencies": []}
    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(subscriber(args.subscribe, stats, ready)) for _ in range(args.subscribers)]
    for _ in range(args.subscribers):
        await asyncio.wait_for(ready.acquire(), 30)
    await asyncio.sleep(0.5)
    await publish(args.publish, args.body, args.content_type, args.rate, args.messages, stats)
    expected = stats["accepted"] * stats["connected"]
    deadline = time.monotonic() + args.drain_secs
    while stats["received"] < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    latencies = stats.pop("latencies")
    print(json.dumps({
        **stats,
        "expected": expected,
        "delivered_ratio": stats["received"] / expected if expected else 0,
        "latency_ms": {
            "p50": percentile(latencies, 0.50) / 1000,
            "p99": percentile(latencies, 0.99) / 1000,
            "max": (max(latencies) if latencies else 0) / 1000,
        },
    }))


if __name__ == "__main__":
    asyncio.run(main())
