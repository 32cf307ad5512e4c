"""What runs on every Ray Train worker: the loop (``loop``), its checkpoints (``checkpoint``), its
per-epoch metrics (``metrics``) and fault injection for rehearsing recovery (``faults``)."""
