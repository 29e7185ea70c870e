"""Hyperparameter search with Ray Tune (`perturbot tune`), aggregated into the metrics store.

space.py    search spaces (YAML; one per solver shipped in spaces/), checked against the solver's options
trial.py    one trial: the tuning maps as one stack, the device-level loop, a report per evaluation
results.py  trials and their reports into the store; the leaderboard read back from it
search.py   the runner: start a search or resume one, then the leaderboard and best.yaml
"""
