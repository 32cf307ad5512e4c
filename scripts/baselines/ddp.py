"""The same under torchrun with DDP over gloo: torchrun --nproc_per_node=N ddp.py WORKLOAD

Every process builds the data, takes its contiguous share and trains with the per-worker batch.
"""

import os
import sys

import torch
import torch.distributed as dist
from common import WORKLOADS, data, emit, model, train
from torch.nn.parallel import DistributedDataParallel

w = WORKLOADS[sys.argv[1]]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x, y = data(w)
share = len(y) // world
x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
batch = w["batch"] if w["epochs"] == 1 else w["batch"] // world  # compute: 256 per worker
result = train(DistributedDataParallel(model(w)), x, y, w, batch)
result["samples_per_s"] *= world
if rank == 0:
    emit(result)
dist.destroy_process_group()
os._exit(0)
