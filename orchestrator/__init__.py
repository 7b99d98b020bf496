"""Ray Tune and MLflow around mosaic_core: sweeps, tracking, the command line."""
