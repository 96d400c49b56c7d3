"""Ray Tune + Optuna sweeps over cxrbench trainer configs (see the sweeps issue)."""
