"""Ray Tune + Optuna sweeps over cxrbench trainer configs: `python -m sweeps.run` (README, Sweeps)."""
