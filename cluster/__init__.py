"""raymerge.cluster: Ray execution of the engine's tensor tasks (see DESIGN.md, contract 8).

``RayExecutor`` (executor.py) implements the engine's ``Executor`` interface; the modules behind
it: units.py (grouping tasks into per-block units), nodes.py (which nodes can take part),
scheduler.py (per-node memory admission, retries, node loss), workers.py (what runs on the
workers: plain tasks and the accelerator actor pool), progress.py (driver-side figures),
connect.py (joining or starting Ray), submit.py (``raymerge submit`` through Ray's Jobs API),
stats.py (statistics actors for ``raymerge stats`` and TACT).
"""

from raymerge.cluster.executor import RayExecutor

__all__ = ["RayExecutor"]
