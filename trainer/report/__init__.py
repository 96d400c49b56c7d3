"""The paper-style comparison of finished runs: `python -m trainer.report --runs RUNS --out OUT`."""
