"""Pipelines: generate -> filter -> train -> eval, each a function a user can import and a
subcommand can call."""
