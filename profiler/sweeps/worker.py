"""One case in its own process: reads a case JSON on stdin, prints its record as the
last line of stdout. A crash here cannot take the sweep down."""
from __future__ import annotations

import json
import sys


def main() -> int:
    request = json.loads(sys.stdin.read())
    from estimator.setup import Setup
    from profiler.measure.run import run_case
    record = run_case(request["model"], Setup.from_dict(request["setup"]), request["backend"],
                      steps=int(request["steps"]), timeline=bool(request.get("timeline", False)))
    sys.stdout.write("\n" + json.dumps(record.to_json()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
