"""The algorithm: adapters, injection, the AROMA controller, the optax wrapper, the jitted step.

This layer imports jax, flax and optax and nothing else of the project
(``tests/test_layers.py`` enforces it). Modules, bottom up: ``config`` (the settings),
``norms`` (eq. 5/6 norms from factors), ``adapters`` (the state pytree), ``inject`` (adding the
adapter's output inside any linen model), ``controller`` (inner check, outer step, merge,
re-init), ``optim`` (masking and resetting optimizer state), ``train_step`` (one compiled step),
``loop`` and ``history`` (driving it and recording what happened), ``sharding`` (mesh rules).
"""
