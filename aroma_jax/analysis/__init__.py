"""Rank-dynamics research toolkit: what a run's adapters learned, from their factors.

``spectra`` (exact singular values of ``s * A @ B`` from QRs of the factors; effective, stable
and numerical rank; energy shares; subspace similarity; Appendix E component cosines),
``runs`` (a run directory or a live `TrainState`, one module's factors at a time),
``timeseries`` (rank, trained parameters, eq. 5/6 traces and inner-loop endings from the
history), ``summary`` (the numbers as plain dicts), ``figures`` and ``report``
(``aroma-jax analyze``). The layer sits above ``train``; only the command line imports it.
See docs/ANALYSIS.md.
"""
