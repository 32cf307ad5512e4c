"""Hyperparameter sweeps on Ray Tune, each trial an ordinary raytrain run:

- ``spec``: the sweep file (its schema, the space checked against the config schema);
- ``layout``: the sweep directory's files, claimed or found for --resume;
- ``trials``: what runs in each trial (Train V2's driver function around raytrain.train.driver);
- ``tuner``: Ray Tune's search, ASHA and ``Tuner.fit()``; ``callbacks``: its console and the
  release of stopped trials' placement groups;
- ``results``: sweep.json, sweep.csv, best.yaml; ``report``: sweep.png and sweep.html.

May import the shared top-level modules, raytrain.data, raytrain.report and raytrain.train;
never raytrain.commands or raytrain.inference.
"""
