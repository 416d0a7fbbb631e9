"""The ground floor: what any long job needs, with no knowledge of GRAIN.

Files written atomically and folders checked before work (files), disk space (disk_space),
several processes in one job (distributed), progress bars (progress), reading ahead in
threads (prefetch), Orbax's follow-up noise after a failed read or write
(orbax_log_filter), and one run per workdir with the clock its budgets count on (runs).
Imports nothing else of grain_jax.
"""
