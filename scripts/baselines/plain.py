"""The tutorial as one plain PyTorch process: python plain.py WORKLOAD THREADS"""

import sys

import torch
from common import WORKLOADS, data, emit, model, train

w = WORKLOADS[sys.argv[1]]
torch.set_num_threads(int(sys.argv[2]))
x, y = data(w)
emit(train(model(w), x, y, w, w["batch"]))
