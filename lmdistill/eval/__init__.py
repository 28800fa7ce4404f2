"""Evaluation: a sandbox for model-written code (`sandbox`) and the statistics of a report
(`stats`: pass@k, Wilson and bootstrap intervals, retention). Tasks live in `lmdistill.tasks`."""
