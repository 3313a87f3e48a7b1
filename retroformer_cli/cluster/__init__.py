"""Playing episodes on a Ray cluster (``--ray ADDRESS`` on collect, eval --env and ppo --mode online).

connect.py (joining or starting the cluster), runner.py (the per-node actor that plays whole tasks),
node_models.py (one local model server per node and the workers' client of it), dispatch.py (the driver: tasks
out, trials back, lost tasks resubmitted), replays.py (ppo's online replays). Ray is imported only here, and only
when ``--ray`` is given.
"""
