#!/usr/bin/env python3
"""SSE reader and checker for tests/netns.sh, independent of temma's own code.

  sse_log.py read URL OUT   read URL as a browser's EventSource does (reconnect with
                            Last-Event-ID after the stream ends or the server is away) and
                            append one line per event to OUT: "msg <id> <text>" or
                            "reset <data>", and "open <url>" for each connection
  sse_log.py check OUT OK   every text listed in OK (one per line) is in OUT exactly once, ids
                            increase within each broker run, and OUT has no reset
  sse_log.py same OUT1 OUT2 OK
                            the texts listed in OK come in the same order in OUT1 and OUT2
"""
import http.client
import sys
import time
import urllib.parse


def read(url, out):
    parts = urllib.parse.urlsplit(url)
    last_id = None
    with open(out, "a", buffering=1) as log:
        while True:
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                headers = {"Accept": "text/event-stream"}
                if last_id:
                    headers["Last-Event-ID"] = last_id
                conn.request("GET", parts.path or "/", headers=headers)
                response = conn.getresponse()
                if response.status != 200:
                    raise OSError(f"status {response.status}")
                log.write(f"open {url}\n")
                event, data, ident = None, [], None
                while True:
                    line = response.fp.readline()
                    if not line:
                        break
                    line = line.decode().rstrip("\n")
                    if line == "":
                        if event == "msg":
                            last_id = ident
                            text = data[0].split('"text":"', 1)[1].split('"', 1)[0]
                            log.write(f"msg {ident} {text}\n")
                        elif event == "reset":
                            log.write(f"reset {' '.join(data)}\n")
                        event, data, ident = None, [], None
                    elif line.startswith("id: "):
                        ident = line[4:]
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)


def check(out, ok):
    wanted = [line.strip() for line in open(ok) if line.strip()]
    seen = {}
    last_seq = {}
    problems = []
    for line in open(out):
        kind, rest = line.rstrip("\n").split(" ", 1)
        if kind == "open":
            continue
        if kind == "reset":
            problems.append(f"reset: {rest}")
            continue
        ident, text = rest.split(" ", 1)
        run, seq = (int(x) for x in ident.split("-"))
        if run in last_seq and seq <= last_seq[run]:
            problems.append(f"{ident} after {run}-{last_seq[run]}: out of order")
        last_seq[run] = seq
        seen[text] = seen.get(text, 0) + 1
    for text in wanted:
        if seen.get(text, 0) != 1:
            problems.append(f"{text} seen {seen.get(text, 0)} times")
    if problems:
        print(f"{out}: " + "; ".join(problems[:20]))
        return 1
    print(f"{out}: all {len(wanted)} messages that got a 200, once each, in order, no reset")
    return 0


def same(out1, out2, ok):
    wanted = {line.strip() for line in open(ok) if line.strip()}

    def order(out):
        texts = []
        for line in open(out):
            kind, rest = line.rstrip("\n").split(" ", 1)
            if kind == "msg":
                text = rest.split(" ", 1)[1]
                if text in wanted:
                    texts.append(text)
        return texts

    first, second = order(out1), order(out2)
    if first != second:
        at = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        print(f"{out1} and {out2} differ in order at message {at}: {first[at:at + 3]} / {second[at:at + 3]}")
        return 1
    print(f"{out1} and {out2}: the same {len(first)} messages in the same order")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "same":
        sys.exit(same(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
