"""Training data: synthetic rows or the user's Parquet files, as Ray Datasets of ``x``/``y`` rows.

- ``tables``: the row format (an ``x`` fixed-size list of float32, a ``y`` int64) and its tensors;
- ``synthetic``: the one generator of synthetic rows, in memory or written as Parquet files;
- ``parquet``: finding, checking and reading a user's Parquet files;
- ``datasets``: the Ray Datasets a run trains and validates on.
"""
