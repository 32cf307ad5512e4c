"""Using a trained model: ``trained`` (a run's best checkpoint, loaded with its hash check, the
feature scaling folded in), ``batch`` (batch prediction on Ray Data actors, the output moved
into place whole) and ``export`` (ONNX and TorchScript, checked against PyTorch).

May import the shared top-level modules, raytrain.data and raytrain.train (checkpoints); never
raytrain.commands or raytrain.sweep.
"""
