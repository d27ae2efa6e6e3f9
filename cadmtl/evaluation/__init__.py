"""Evaluation wing: the metrics (one place), the evaluation loop, paper-shaped reporting, the evaluate command."""
