"""Training data: synthetic rows or the user's Parquet or CSV files, as Ray Datasets of ``x``/``y``
rows.

- ``tables``: the row format (an ``x`` fixed-size list of float32, a ``y`` int64) and its tensors;
- ``synthetic``: the one generator of synthetic rows, in memory or written as Parquet files;
- ``files``: finding a user's Parquet or CSV files, checking their schemas, reading them
  (``csvfiles``: what differs for CSV);
- ``columns``: the user's columns as the model's numbers (types, vocabularies of categories,
  imputation of missing values, class names, a regression target's standardisation);
- ``checks``: the pass over their rows before training;
- ``scaling``: the training split's feature statistics and standardisation;
- ``datasets``: the Ray Datasets a run trains and validates on.

May import the shared top-level modules only (config, errors, storage).
"""
