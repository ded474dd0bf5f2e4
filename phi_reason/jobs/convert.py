"""`phi-reason convert`: the checkpoint conversions as a job. Conversion streams one tensor at a
time through the host (no device work). Under several processes process 0 converts in a
single-process child (so nothing inside waits for the other processes) while the others wait at a
barrier; all then exit with the child's status: one output, written once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ..checkpoint import convert
from ..sharding import processes
from ..sharding.mesh import initialize_distributed

_CHILD = ("import json, sys; from phi_reason import cli; "
          "from phi_reason.checkpoint import convert; "
          "sys.exit(cli.report_errors(getattr(convert, sys.argv[1]), **json.loads(sys.argv[2])))")


def _once(direction: str, **kwargs) -> int:
    initialize_distributed()
    if processes.process_count() == 1:
        getattr(convert, direction)(**kwargs)
        return 0
    rc = 0
    if processes.is_lead():
        env = dict(os.environ, PHI_REASON_DISTRIBUTED="off")
        args = json.dumps({k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                           for k, v in kwargs.items()})
        rc = subprocess.run([sys.executable, "-c", _CHILD, direction, args], env=env).returncode
    return int(processes.gather_texts(str(rc))[0])  # every process waits for process 0's result


def hf_to_orbax(**kwargs) -> int:
    return _once("hf_to_orbax", **kwargs)


def orbax_to_hf(**kwargs) -> int:
    return _once("orbax_to_hf", **kwargs)
