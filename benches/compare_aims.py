#!/usr/bin/env python3
"""Issue 14's aims, judged from the reports `benches/compare.sh` wrote in OUT (its only
argument): each aim with temma's figure, Nchan's, their ratio, and whether it is met; then
whether every scenario delivered everything (no gap, no duplicate). An aim whose reports are
missing (its scenario was not run) is said to be so.

Where temma-floor ran too (the `floor` peer: the least an SSE fan-out server can spend), each
aim set against Nchan also says the floor's ratio, and an aim the floor itself misses is out of
reach on this machine for any server: said so beside "not met"."""
import json
import os
import sys

OUT = sys.argv[1]


def report(name):
    path = os.path.join(OUT, name)
    return json.load(open(path)) if os.path.exists(path) else None


def p(r, key, client):
    """A latency percentile in ms, from temma-load's (µs) or sse_reader's (ms) report."""
    return r["latency_us"][key] / 1000 if client == "temma-load" else r["latency_ms"][key]


rows = []


def aim(text, value, bound, met, unit):
    rows.append((text, value, bound, met, unit))


def scenario_file(scenario, client, server):
    if client == "temma-load":
        return f"{scenario}-{server}.json"
    return f"independent-{scenario}-{server}.json"


def rounds_of(scenario, client, server):
    """A server's reports of a scenario: round 1 (SCENARIO-NAME.json), then any later rounds
    compare.sh ran, the servers taking turns (SCENARIO-rN-NAME.json)."""
    first = report(scenario_file(scenario, client, server))
    if first is None:
        return []
    rounds, n = [first], 2
    while client == "temma-load" and (r := report(f"{scenario}-r{n}-{server}.json")) is not None:
        rounds.append(r)
        n += 1
    return rounds


def median(values):
    """The lower middle of an even count, as for the broker's rounds."""
    return sorted(values)[(len(values) - 1) // 2]


def compare(text, scenario, client, measure, factor, unit):
    t, n, f = (rounds_of(scenario, client, s) for s in ("temma", "nchan", "floor"))
    if not t or not n:
        rows.append((text, None, None, None, unit))
        return
    tv, nv = median([measure(r) for r in t]), median([measure(r) for r in n])
    value = f"{tv:.2f} {unit} vs Nchan's {nv:.2f} {unit} ({tv / nv:.2f}×)"
    met = tv <= factor * nv
    if f and any(r["received"] != r["expected"] for r in f):
        value += "; the floor lost messages, no reference"
    elif f:
        fv = median([measure(r) for r in f])
        value += f"; the floor {fv:.2f} {unit} ({fv / nv:.2f}×)"
        if not met and fv > factor * nv:
            met = "out of reach here: the floor misses it too"
    rounds = min(len(t), len(n))
    if rounds > 1:
        value += f"; medians of {rounds} rounds taking turns (temma's rounds: " + ", ".join(
            f"{measure(r):.2f}" for r in t) + "; Nchan's: " + ", ".join(f"{measure(r):.2f}" for r in n) + ")"
    aim(text, value, f"≤ {factor}× Nchan's", met, unit)


def cpu(key):
    return lambda r: r["server_cpu"][key]


light = report("light-temma.json")
if light:
    v = light["latency_us"]["p50"] / 1000
    aim("light 10 × 20: POST → SSE p50 (temma-load)", f"{v:.2f} ms", "≤ 0.5 ms", v <= 0.5, "ms")
else:
    rows.append(("light 10 × 20: POST → SSE p50 (temma-load)", None, None, None, "ms"))
for client in ("temma-load", "sse_reader"):
    compare(f"light 10 × 20: p99 ({client})", "light", client, lambda r, c=client: p(r, "p99", c), 1, "ms")
compare("10 × 50: server CPU per message", "permessage", "temma-load", cpu("per_message_us"), 0.5, "µs")
compare("1000 × 20: server CPU per delivery", "delivery", "temma-load", cpu("per_delivery_us"), 0.5, "µs")
for scenario, label in (("medium", "100 × 50"), ("wide", "1000 × 10")):
    for client in ("temma-load", "sse_reader"):
        compare(f"{label}: p99 ({client})", scenario, client, lambda r, c=client: p(r, "p99", c), 0.5, "ms")

broker_path = os.path.join(OUT, "broker.jsonl")
runs = {}  # each broker scenario's rounds, read once: for the aims and the losses
if os.path.exists(broker_path):
    for line in open(broker_path):
        r = json.loads(line)
        if "msgs_per_s" in r:  # not `per-script`'s lines
            runs.setdefault(r["scenario"], []).append(r)
    # A scenario run in several rounds (`--rounds`, taking turns with the others): its median
    # round by rate (the lower middle of an even count).
    broker = {name: sorted(rs, key=lambda r: r["msgs_per_s"])[(len(rs) - 1) // 2]
              for name, rs in runs.items()}
    none, proxy = broker.get("none"), broker.get("libzmq-proxy")
    if none and proxy:
        lossless = all(r["received"] == r["sent"] for r in runs["none"])
        rounds = min(len(runs["none"]), len(runs["libzmq-proxy"]))
        aim("broker pass-through, lossless, against libzmq's proxy",
            f"{none['msgs_per_s']:.0f} vs {proxy['msgs_per_s']:.0f} msg/s ({none['msgs_per_s'] / proxy['msgs_per_s']:.2f}×; "
            f"proxy received {100 * proxy['received'] / proxy['sent']:.0f} %"
            + (f"; medians of {rounds} rounds taking turns" if rounds > 1 else "") + ")",
            "≥ 1× the proxy's, lossless", lossless and none["msgs_per_s"] >= proxy["msgs_per_s"], "msg/s")
    relay = broker.get("crate-relay")
    if relay and proxy:
        # Not an aim: the zeromq crate alone (a bare PULL → PUB loop), what temma's broker is
        # built on, against the same proxy — where the wall is.
        cpus = "; ".join(f"{name} {broker[name]['cpu_us_per_msg']:.2f}"
                         for name in ("libzmq-proxy", "crate-relay", "none")
                         if broker.get(name, {}).get("cpu_us_per_msg") is not None)
        print(f"the zeromq crate alone: {relay['msgs_per_s']:.0f} msg/s "
              f"({relay['msgs_per_s'] / proxy['msgs_per_s']:.2f}× the proxy's), "
              f"{relay['received']}/{relay['sent']} received; CPU µs per message: {cpus}")
    chain = broker.get("default-chain")
    if chain:
        aim("broker, shipped moderation chain", f"{chain['msgs_per_s']:.0f} msg/s", "≥ 100000 msg/s",
            chain["msgs_per_s"] >= 100_000, "msg/s")
    workers = broker.get("chain-workers")
    if workers:
        aim("broker, shipped chain on 2 threads", f"{workers['msgs_per_s']:.0f} msg/s", "≥ 100000 msg/s",
            workers["msgs_per_s"] >= 100_000, "msg/s")
else:
    rows.append(("broker (pass-through, shipped chain)", None, None, None, ""))

print("aims (issue 14):")
for text, value, bound, met, unit in rows:
    if value is None:
        print(f"  {text}: not run")
    else:
        verdict = "MET" if met is True else "not met" if met is False else f"not met ({met})"
        print(f"  {text}: {value}; aim {bound}: {verdict}")

print("losses (every scenario must deliver 100 %, no gap, no duplicate):")
lossy = 0
for name in sorted(os.listdir(OUT)):
    # The floor drops a subscriber whose socket is full (it has no queue): not a product.
    if not name.endswith(".json") or name.startswith("fanout-") or name.endswith("-floor.json"):
        continue
    r = json.load(open(os.path.join(OUT, name)))
    if "expected" not in r or r.get("accepted", 1) == 0 or r["expected"] == 0:
        continue
    bad = r["received"] != r["expected"] or r.get("gaps", 0) or r.get("duplicates", 0)
    if bad:
        lossy += 1
        print(f"  {name}: {r['received']} of {r['expected']}, gaps {r.get('gaps', 0)}, duplicates {r.get('duplicates', 0)}")
# temma's brokers (not libzmq's proxy nor the bare crate, whose PUB drops by design).
for name, rounds in runs.items():
    if name in ("libzmq-proxy", "crate-relay"):
        continue
    for r in rounds:
        if r["received"] != r["sent"] or not r["in_order"]:
            lossy += 1
            print(f"  broker.jsonl {r['scenario']} #{r.get('round', 1)}: {r['received']} of "
                  f"{r['sent']}, in order {r['in_order']}")
print(f"  {'none' if lossy == 0 else f'{lossy} report(s) with a loss'}"
      " (fan-out steps past the highest rate held are left out: they end the search)")
