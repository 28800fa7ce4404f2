"""Evaluation: what the student kept and what it costs.

`runner.evaluate` scores a student, its teacher and a baseline on tasks (verifiable generation,
multiple choice by log-likelihood, code pass@k in `sandbox`, teacher-relative metrics), with
intervals from `stats`, results cached per (model, task, settings); `cost` measures size, speed and
memory; `report.write_report` writes report.md / report.html / report.json."""
