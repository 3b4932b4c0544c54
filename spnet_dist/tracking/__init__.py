"""MLflow tracking (rank 0 of a training run) and the verbs that read the store.

tracker (the API the trainer calls: builds records) -> outbox (store now, or spool while it is unreachable) ->
store (applies records to MLflow); spool (the journal and its replay); env (host/SLURM/git tags, HTTP limits);
runs (small MLflow operations for launch/); artifacts, sysmetrics (what a run logs besides scalars);
frontier (`spnet frontier`), reference (published points), ui (`spnet ui`). Only this package imports mlflow.
"""
