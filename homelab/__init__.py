"""The core of homelab-flows: config models, plans, gate verdicts and drift diffs.

Nothing here imports Prefect or opens a connection; it reads the files it is given.
"""
