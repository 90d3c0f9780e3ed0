"""Evaluation and analysis: lm-eval bridge and local tasks, held-out loss, routing statistics, plots, reports."""
