"""Hyperparameter tuning with Ray Tune (search spaces, runner, leaderboards): arrives with its issue."""
