"""Helper for the kill -9 durability test: log events forever, report each commit.

    python tests/support/event_log_writer.py DBPATH START [normal|full]

Opens an EventLog on DBPATH, prints "ready", then loops forever alternating single ``log()``
calls and small ``log_many()`` batches. Every event gets a unique sequence number from START
upwards, stored as its item ("s<seq>") and in its context ({"batch": first seq of its call,
"size": events in the call}), so the test can check both that reported commits exist and that
no batch was half stored. Only AFTER a call returns does the writer print what it committed:
"L <seq> <id>" for a single event, "B <first> <last>" for a batch, flushed at once.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from device_sdk.event_log import EVENT_KINDS, EventLog  # noqa: E402


def main() -> None:
    path, start = sys.argv[1], int(sys.argv[2])
    durability = sys.argv[3] if len(sys.argv) > 3 else "normal"
    rng = random.Random(start)
    log = EventLog(path, durability=durability)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    seq = start
    while True:
        if rng.random() < 0.5:
            row_id = log.log(f"s{seq}", rng.choice(EVENT_KINDS), context={"batch": seq, "size": 1})
            out.write(f"L {seq} {row_id}\n")
            seq += 1
        else:
            size = rng.randint(2, 20)
            batch = [
                (f"s{s}", rng.choice(EVENT_KINDS), None, {"batch": seq, "size": size})
                for s in range(seq, seq + size)
            ]
            log.log_many(batch)
            out.write(f"B {seq} {seq + size - 1}\n")
            seq += size
        out.flush()


if __name__ == "__main__":
    main()
