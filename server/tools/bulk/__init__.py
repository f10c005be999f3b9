"""`spillway batch`: a CSV or JSONL file of prompts -> a folder of images, resumably.

Every output image is written atomically (``name.partial`` then ``os.replace``) and then
recorded in ``manifest.jsonl`` (appended and fsynced), so an interrupted run leaves a
consistent folder and re-running the same command makes only what is missing.

In-process (``server=None``) the engine is loaded once and pending outputs are grouped by
(width, height, steps) into batched pipeline calls. Against a server, rows are POSTed to
``/v1/images/generations`` with ``concurrency`` requests in flight.
"""

from server.tools.bulk.rows import BulkError
from server.tools.bulk.run import run_bulk

__all__ = ["BulkError", "run_bulk"]
