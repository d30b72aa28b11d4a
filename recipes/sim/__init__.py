"""Simulation of pushes at scale: shapes-only metadata and the cost model that predicts a push.

Not part of the runtime library (``fsdp_sync``): nothing a push runs imports these.
``recipes.simulate`` is the command that uses them.

* ``scale_models``: trillion-parameter MoE shapes and the trainers' and engines' layouts;
* ``cost_model``: per-sender stage counts and the pipeline replay, fitted on benchmark runs.
"""
