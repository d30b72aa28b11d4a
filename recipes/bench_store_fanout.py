"""The TCPStore's share of a push at full rank count: one announcement, N readers, M acks.

    python -m recipes.bench_store_fanout [--senders 256] [--receivers 128] [--pushes 20]

A push's control plane on the store is: trainer rank 0 sets the push key, every other
rank (senders and receivers) reads it, every receiver sets its ack, and rank 0 reads all
the acks at once. Here each rank is a TCPStore client connection driven by a thread of one
process (the store calls release the GIL), so 384 ranks fit on a small machine without
384 Python interpreters competing for its cores: what is measured is the store server
and the connections, not each rank's own Python. Prints the median and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from datetime import timedelta

from torch.distributed import TCPStore

from .jobs import free_port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=256)
    ap.add_argument("--receivers", type=int, default=128)
    ap.add_argument("--pushes", type=int, default=20)
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args(argv)
    port = free_port()
    master = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    others = args.senders - 1 + args.receivers
    clients = [TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60)) for _ in range(others)]
    ready = threading.Barrier(others + 1)
    errors: list[BaseException] = []

    def rank(i: int) -> None:
        store, is_receiver = clients[i], i >= args.senders - 1
        try:
            for push in range(args.pushes + 1):
                ready.wait()
                store.get(f"push/{push}")  # blocks until rank 0 announces
                if is_receiver:
                    store.set(f"ack/{push}/{i}", "ok")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=rank, args=(i,), daemon=True) for i in range(others)]
    for t in threads:
        t.start()
    ack_keys = [[f"ack/{p}/{i}" for i in range(args.senders - 1, others)] for p in range(args.pushes + 1)]
    times = []
    for push in range(args.pushes + 1):
        ready.wait()
        started = time.perf_counter()
        master.set(f"push/{push}", "go")
        master.wait(ack_keys[push])
        master.multi_get(ack_keys[push])
        if push:  # the first one warms the connections
            times.append(time.perf_counter() - started)
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    median = statistics.median(times)
    print(f"store fan-out on CPU ({os.cpu_count()} cores): {args.senders} senders, {args.receivers} receivers, one "
          f"TCPStore: median {median * 1e3:.2f} ms a push over {args.pushes} (min {min(times) * 1e3:.2f}, "
          f"max {max(times) * 1e3:.2f})")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(args.out, f"store-fanout-cpu-{args.senders}x{args.receivers}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({**vars(args), "median_s": median, "times_s": times}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
