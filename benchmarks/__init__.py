"""
The benchmarks of ``delivery``: not part of the library, and not installed with it.

:mod:`benchmarks.bench` runs the scenarios (``scripts/bench``, or ``python -m benchmarks``
from the repository's root); :mod:`benchmarks.bench_receiver` and
:mod:`benchmarks.bench_load` are the processes it starts (the receiver, and the load of
``ingest-http`` and ``scale-out``); :mod:`benchmarks.bench_soak` and
:mod:`benchmarks.bench_scale` hold the ``soak`` and ``scale-out`` scenarios;
:mod:`benchmarks.bench_plot` draws ``--plot``. They use the library as
its users do: its public names, ``delivery.store.open_store`` and the daemon.
"""
