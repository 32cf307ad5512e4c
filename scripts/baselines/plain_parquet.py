"""A plain single-thread pass over Parquet, no Ray: python plain_parquet.py DIR BATCH MODE

MODE "train": pyarrow.dataset batches -> torch.from_numpy -> a Linear(features, 2) SGD step (lr
0.01), one epoch over every row; "scan": the same batches turned into NumPy arrays, no model.
Prints one JSON line: {"first_step_at": unix time, "epoch_s": [seconds], "rows": n}.
"""

import json
import sys
import time
import warnings

import pyarrow.dataset as pads
import torch
import torch.nn.functional as F

path, batch, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
# The batches are Arrow's read-only buffers, used as they are (no copy), as fast as it gets.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
dataset = pads.dataset(path, format="parquet")
width = dataset.schema.field("x").type.list_size
torch.manual_seed(0)
model = torch.nn.Linear(width, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
first = None
rows = 0
started = time.perf_counter()
for part in dataset.to_batches(batch_size=batch, columns=["x", "y"]):
    x = part.column(0).flatten().to_numpy().reshape(-1, width)
    y = part.column(1).to_numpy()
    rows += len(y)
    if mode == "scan":
        continue
    xb, yb = torch.from_numpy(x), torch.from_numpy(y)
    if first is None:
        first = time.time()
    loss = F.cross_entropy(model(xb), yb)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
elapsed = time.perf_counter() - started
print("BENCH " + json.dumps({"first_step_at": first, "epoch_s": [elapsed], "rows": rows}))
