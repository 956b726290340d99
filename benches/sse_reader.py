#!/usr/bin/env python3
"""An independent SSE load client, written apart from temma (Python, standard library only),
so that no comparison depends on temma's own tool alone.

It opens SUBSCRIBERS streams on SUBSCRIBE_URL, then POSTs MESSAGES bodies to PUBLISH_URL at
RATE per second, each carrying a marker `load-<seq>-<send time in µs>`; every subscriber finds
the markers in what it reads and the tool prints one JSON object: deliveries expected and
received, duplicates, and the latency from send to receipt (p50, p99, max, in ms).

  benches/sse_reader.py --subscribe http://127.0.0.1:8090/event/fetch \
      --publish http://127.0.0.1:8090/message/broadcast --subscribers 500 --rate 10 --messages 100

So that the figures are the server's rather than the reader's own, the streams are read by one
epoll loop over plain non-blocking sockets (every ready socket read and time-stamped first, the
markers looked for after), and the publisher runs in a process of its own; both take their
times from CLOCK_MONOTONIC, which is one clock for all processes.

Loopback only; plain HTTP/1.1; the body template takes `{seq}` and `{ts}` like temma-load's.
"""
import argparse
import json
import multiprocessing
import re
import select
import socket
import time
import urllib.parse

MARKER = re.compile(rb"load-(\d+)-(\d+)")


def now_us():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def target(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{url}: loopback http:// URLs only")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def read_head(sock):
    """The response head, and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def subscribe(url, count):
    """COUNT open streams: a list of (socket, bytes already read after the head), and the failures."""
    host, port, path = target(url)
    streams, failed = [], 0
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(request)
        head, rest = read_head(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            failed += 1
            sock.close()
            continue
        sock.setblocking(False)
        streams.append((sock, rest))
    return streams, failed


def publish(url, body_template, content_type, rate, messages, results):
    """The publisher's process: POSTs at RATE, then sends the number accepted through RESULTS."""
    host, port, path = target(url)
    sock = socket.create_connection((host, port), timeout=30)
    accepted = 0
    started = time.monotonic()
    for seq in range(messages):
        delay = started + seq / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = body_template.replace("{seq}", str(seq)).replace("{ts}", str(now_us())).encode()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head, rest = read_head(sock)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        if head.split(b"\r\n")[0].split(b" ")[1].startswith(b"2"):
            accepted += 1
    sock.close()
    results.send(accepted)
    results.close()


def percentile(values, fraction):
    if not values:
        return 0
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribe", required=True)
    parser.add_argument("--publish", required=True)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--body", default="from=load&text=load-{seq}-{ts}")
    parser.add_argument("--content-type", default="application/x-www-form-urlencoded")
    parser.add_argument("--drain-secs", type=float, default=3)
    parser.add_argument(
        "--per-message",
        metavar="FILE",
        help="write one line per message to FILE: seq, send time (CLOCK_MONOTONIC µs), "
        "fastest and slowest delivery (µs), deliveries",
    )
    args = parser.parse_args()

    streams, failed = subscribe(args.subscribe, args.subscribers)
    poller = select.epoll()
    buffers, seen = {}, {}
    for sock, rest in streams:
        poller.register(sock.fileno(), select.EPOLLIN)
        buffers[sock.fileno()] = rest
        seen[sock.fileno()] = set()
    sockets = {sock.fileno(): sock for sock, _ in streams}
    time.sleep(0.5)

    results, child_end = multiprocessing.Pipe(duplex=False)
    publisher = multiprocessing.get_context("fork").Process(
        target=publish,
        args=(args.publish, args.body, args.content_type, args.rate, args.messages, child_end),
    )
    publisher.start()
    child_end.close()
    poller.register(results.fileno(), select.EPOLLIN)

    received = duplicates = 0
    accepted = None
    latencies = []
    per_message = {}
    deadline = None
    while True:
        if accepted is not None:
            if received >= accepted * len(sockets) or time.monotonic() >= deadline:
                break
        ready = poller.poll(0.05)
        # Every ready stream read and time-stamped first, then its markers looked for.
        chunks = []
        for fd, _ in ready:
            if fd == results.fileno():
                accepted = results.recv()
                deadline = time.monotonic() + args.drain_secs
                poller.unregister(fd)
                continue
            try:
                chunk = sockets[fd].recv(65536)
            except BlockingIOError:
                continue
            chunks.append((fd, chunk, now_us()))
        for fd, chunk, at in chunks:
            if not chunk:
                poller.unregister(fd)
                continue
            data = buffers[fd] + chunk
            end = data.rfind(b"\n\n")
            if end < 0:
                buffers[fd] = data
                continue
            buffers[fd] = data[end + 2 :]
            mine = seen[fd]
            for match in MARKER.finditer(data, 0, end + 2):
                seq = int(match.group(1))
                if seq in mine:
                    duplicates += 1
                    continue
                mine.add(seq)
                received += 1
                sent = int(match.group(2))
                latencies.append(at - sent)
                if args.per_message:
                    entry = per_message.setdefault(seq, [sent, at - sent, at - sent, 0])
                    entry[1] = min(entry[1], at - sent)
                    entry[2] = max(entry[2], at - sent)
                    entry[3] += 1
    publisher.join()
    for sock in sockets.values():
        sock.close()
    expected = accepted * len(sockets)
    if args.per_message:
        with open(args.per_message, "w") as out:
            for seq in sorted(per_message):
                sent, fastest, slowest, count = per_message[seq]
                out.write(f"{seq} {sent} {fastest} {slowest} {count}\n")
    print(json.dumps({
        "connected": len(sockets),
        "failed": failed,
        "received": received,
        "duplicates": duplicates,
        "accepted": accepted,
        "expected": expected,
        "delivered_ratio": received / expected if expected else 0,
        "latency_ms": {
            "p50": percentile(latencies, 0.50) / 1000,
            "p99": percentile(latencies, 0.99) / 1000,
            "max": (max(latencies) if latencies else 0) / 1000,
        },
    }))


if __name__ == "__main__":
    main()
