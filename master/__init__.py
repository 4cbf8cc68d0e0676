"""objfs master: cluster membership and preload jobs.

The master is the cluster's management node (US3FS Master): daemons started with
``--master URL`` register and heartbeat (``protocol``), and ``POST /v1/preloads`` warms named
data into their caches: the master lists it (``origin``), gives each extent to the member that
owns it (``planner``), and tracks every extent through an explicit state machine (``jobs``,
``coordinator``) kept in LMDB (``state``) so a restarted master resumes. ``app`` is the thin
HTTP adapter, ``server`` runs ``objfs master``, ``client`` is the Python client the CLI uses.
It is never on the read path: a master that is down stops preloading, nothing else.
"""
