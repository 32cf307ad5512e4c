"""A training run. The driver's side: ``driver`` (build the datasets and the TorchTrainer, fit
while the console follows) and ``outcome`` (a stop, the best checkpoint and its validation,
results.json). Every worker's side: ``loop`` (the per-worker loop), ``checkpoint``, ``metrics``
(rows, TensorBoard), ``optim``, ``stopping`` (early stopping and the best-checkpoint rule),
``faults`` (RAYTRAIN_FAIL_AT) and ``gloo`` (each worker's Gloo on its node's interface).

The worker's modules know nothing of the command line, the console or where they run. May
import the shared top-level modules, raytrain.data and raytrain.report (the driver's console
and report); never raytrain.commands, raytrain.inference or raytrain.sweep.
"""
