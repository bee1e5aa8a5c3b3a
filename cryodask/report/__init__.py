"""Run reports: per-block, per-stage wall/CPU/RSS/bytes, a printed table, JSON, PNG and Dask's HTML.

Adding it to a command takes three lines (``cryodask autopick``, ``cryodask crisp``, ...):

1. in the CLI, an option and the session around the work::

       from .options import REPORT                      # --report DIR
       ...
       report: Path = REPORT,
       ...
       from ..report import run_report
       with cluster_session(...) as client, run_report(report, client, command="autopick"):
           result = run(...)

2. in the block task (it runs on a worker), the stages::

       from ..report import stage
       with stage("read", block=name) as s:
           image = read_micrograph(path).image
           s.bytes_read = image.nbytes
       with stage("infer"):
           scores = model(image)
       with stage("write") as s:
           s.bytes_written = write_particles_star(...).stat().st_size

   A task that cannot be edited is timed whole with ``client.submit(recorded(fn, "infer"), ...)``;
   a ``read(region)`` callable with ``RecordedRead(read)``.

Stage names: read, preprocess, infer, post-process, write (any other name is shown after them).
"""

from .session import run_report
from .stages import RecordedRead, recorded, stage

__all__ = ["run_report", "stage", "recorded", "RecordedRead"]
