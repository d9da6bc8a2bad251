"""``python -m trainer.simulation.worker``: one local worker process of the simulator.

Reads JSON lines ``{"id", "op", "args"}`` on stdin and answers ``{"id", "result"}`` or
``{"id", "error"}`` on stdout, one operation at a time; "init" creates its DeviceWorker
(or FastDeviceWorker in fast mode: ``backends.worker_class``).
Ctrl-C is ignored: the coordinator stops the worker by closing stdin."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the LiteRT interpreter's INFO lines
    from trainer.simulation.backends import worker_class

    worker = None
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        message = json.loads(line)
        reply: dict = {"id": message["id"]}
        try:
            if message["op"] == "init":
                worker = worker_class(message["args"])(message["args"])
                reply["result"] = True
            elif worker is None:
                raise RuntimeError("init first")
            else:
                reply["result"] = worker.handle(message["op"], message["args"])
        except Exception:  # reported to the coordinator, which stops the simulation
            reply["error"] = traceback.format_exc()
        try:
            out.write(json.dumps(reply).encode() + b"\n")
            out.flush()
        except BrokenPipeError:  # the coordinator is gone (Ctrl-C): nobody to answer
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
