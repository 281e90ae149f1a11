"""One rank of a distributed case, started by PyTorch's launcher (``torch.distributed.run``).

``python -m torch.distributed.run --standalone --nproc_per_node N -m profiler.measure.dist_worker '<json>'``

The JSON names ``model``, ``setup`` (a Setup dict with ``sharding`` ddp, fsdp or zero3),
``backend`` (cpu: gloo; cuda: nccl), ``steps``, ``out`` (the JSONL file rank 0 writes the
gathered records to) and ``timeout_s`` (collectives time out instead of hanging); ``crash_rank``, for tests, makes that
rank exit at once.
Every rank also writes its own record to ``<out>.rank<r>`` first, so a rank that cannot
take part in the gather still leaves its record behind. See :mod:`profiler.measure.distributed`.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv=None) -> int:
    from profiler.measure.procs import die_with_parent
    die_with_parent(os.getppid())  # torchrun killed outright (SIGKILL) takes this rank with it
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m profiler.measure.dist_worker '<json request>'\n")
        return 2
    request = json.loads(argv[0])
    import datetime

    import torch
    import torch.distributed as dist

    from estimator.setup import Setup
    from profiler.measure.distributed import rank_record

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = request["backend"] == "cuda"
    timeout = datetime.timedelta(seconds=float(request.get("timeout_s", 120)))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    try:
        if request.get("crash_rank") == rank:  # tests of the failure path: die like a segfault would
            os._exit(3)
        record = rank_record(request["model"], Setup.from_dict(request["setup"]), request["backend"],
                             int(request["steps"]), rank, world, local_rank).to_json()
        out = request.get("out")
        if out:
            with open(f"{out}.rank{rank}", "w", encoding="utf-8") as fh:
                json.dump(record, fh)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(record, gathered, dst=0)
        if rank == 0:
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in gathered)
            if out:
                with open(out, "w", encoding="utf-8") as fh:
                    fh.write(lines)
            sys.stdout.write(lines)
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
