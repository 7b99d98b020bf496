"""MLflow tracking of a sweep: `names` (every tag and key it writes), `runs` (every call to MLflow's
client), `callback` (Ray Tune's events into runs and results-store rows)."""
