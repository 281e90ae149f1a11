"""A stand-in campaign worker speaking the real protocol (profiler/campaign.py), whose
behaviour per case is chosen by the case's batch size, so the scheduler's failure paths
can be driven without a GPU:

batch 1: ok after 0.3 s      batch 2: ok after 1.0 s
batch 3: oom on the first attempt, ok on the next (a marker file in $FAKE_STATE)
batch 4: the process dies (exit 3)      batch 5: hangs (the case timeout must stop it)
batch 6: ok, but the case is unclean (leaked): the worker exits after answering
any other batch: ok after 1.0 s
"""
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    backend = sys.argv[-1]
    state = Path(os.environ["FAKE_STATE"])
    out = sys.stdout

    def send(msg):
        out.write(json.dumps(msg) + "\n")
        out.flush()

    send({"op": "imported", "pid": os.getpid()})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "init":
            ready = {"op": "ready", "versions": {"fake": "1"}, "device": {"name": "fake"}}
            t0 = time.time()
            if backend == "cuda":  # as a CUDA worker: a measured context and the card's free memory
                time.sleep(0.2)
                ready.update(context={"idle_used_bytes": 1000, "context_bytes": 500, "process_used_bytes": 600},
                             free_bytes=int(os.environ.get("FAKE_FREE_BYTES", 100 * 2**30)))
            with open(state / "events.jsonl", "a") as fh:
                fh.write(json.dumps({"init": [t0, time.time()], "pid": os.getpid()}) + "\n")
            send(ready)
        elif msg["op"] == "exit":
            return 0
        elif msg["op"] == "case":
            batch = msg["setup"]["batch"]
            t0 = time.time()
            with open(state / "events.jsonl", "a") as fh:
                fh.write(json.dumps({"key": msg["key"], "start": t0, "pid": os.getpid()}) + "\n")
            status, clean = "ok", True
            if batch == 4:
                os._exit(3)
            if batch == 5:
                time.sleep(3600)
            if batch == 3:
                marker = state / f"oom-{msg['key']}"
                if not marker.exists():
                    marker.write_text("x")
                    status = "oom"
            if batch == 6:
                clean = False
            time.sleep(0.3 if batch in (1, 3, 6) else 1.0)
            case = {"model": msg["model"], "config_hash": None, "setup": msg["setup"], "backend": backend,
                    "steps": msg["steps"]}
            record = {"schema": 1, "case": case,
                      "case_key": msg["key"], "backend": backend, "status": status, "message": "",
                      "measured": {"peak_allocated_bytes": batch, "peak_reserved_bytes": 2**20,
                                   "nvml_peak_used_bytes": 8 * 2**20, "nvml_peak_process_bytes": 3,
                                   "nvml_idle_used_bytes": 1000, "categories": {"context": 1}},
                      "fake_times": {"start": t0, "end": time.time()}}
            send({"op": "record", "record": record, "clean": clean})
            if not clean:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
