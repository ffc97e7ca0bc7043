"""``python exit_probe.py OUT_DIR CONFIG [ARGS]``: ``ferrytune.launch.train`` as torchrun runs it, then
the native threads this rank still has are written to ``OUT_DIR/threads-RANK.json``.

A thread of a C++ object that outlived the run (a process group that was never freed) is what
aborts an interpreter at exit; listing them after ``main`` returns catches the leak every time,
where the abort itself happens only sometimes (it depends on the order of static destruction).
"""

import json
import os
import sys
from pathlib import Path

from ferrytune.launch.train import main

out, argv = Path(sys.argv[1]), sys.argv[2:]
rc = main(argv)
tasks = Path("/proc/self/task")
names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
(out / f"threads-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"rc": rc, "threads": names}))
sys.exit(rc)
