"""The same under torchrun with DDP over gloo: torchrun --nproc_per_node=N ddp.py WORKLOAD

Every process builds the data, takes its contiguous share and trains with the per-worker batch.
"""

import os
import sys

import torch
import torch.distributed as dist
from common import WORKLOADS, emit, train_share
from torch.nn.parallel import DistributedDataParallel

w = WORKLOADS[sys.argv[1]]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = train_share(w, rank, world, DistributedDataParallel)
if rank == 0:
    emit(result)
dist.destroy_process_group()
os._exit(0)
