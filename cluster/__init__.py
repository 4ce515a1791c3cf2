"""raymerge.cluster: Ray execution of the engine's tensor tasks (see DESIGN.md, contract 8).

``run_ray`` (executor.py) is the entry point ``merge(..., executor="ray")`` calls; the modules
behind it: units.py (grouping tasks into per-block units), nodes.py (which nodes can take part),
scheduler.py (per-node memory admission, retries, node loss), workers.py (what runs on the
workers: plain tasks and the accelerator actor pool), progress.py (driver-side figures),
connect.py (joining or starting Ray), submit.py (``raymerge submit`` through Ray's Jobs API).
"""
