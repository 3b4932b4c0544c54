"""MLflow tracking (rank 0): mlflow_tracker (runs, spool + replay), frontier (`spnet frontier`), ui (`spnet ui`)."""
