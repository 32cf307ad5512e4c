"""raytrain: data-parallel PyTorch training on CPUs with Ray Train.

    raytrain train --workers 4                      # embedded Ray on this machine
    raytrain train --workers 8 --address auto       # an existing Ray cluster
    python -m raytrain.main --workers 4             # the same as raytrain train

The package in layers; a module imports only from its own layer's shared modules and the
layers below it (tests/test_layout.py checks this and that there is no import circle):

- the shared modules, here at the top: ``errors``, ``config`` (the schema, the only place
  defaults live), ``storage`` (paths and object-store URIs), ``runs`` (the run directory's
  files), ``model``, ``evaluate`` (validation metrics), ``cluster`` (Ray: join or start, size
  the request), ``tracking`` (MLflow);
- ``data/``: the user's rows, checked and read; ``report/``: what a run shows (console, page,
  plots, the list of runs);
- ``train/``: a run, the driver's side (``driver``, ``outcome``) and every worker's (``loop``);
- ``inference/``: using a trained model (load, batch prediction, export); ``sweep/``:
  hyperparameter sweeps on Ray Tune;
- ``commands/``: one module per subcommand, its parser and its ``run(args)``;
- ``cli`` (the ``raytrain`` command), ``__main__`` and ``main`` (``python -m raytrain.main``).
"""

__version__ = "0.1.0"
