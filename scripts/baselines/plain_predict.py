"""Plain batch prediction, no Ray: python plain_predict.py DATA_DIR OUT_DIR BATCH

One process, one torch thread: every Parquet file read in batches with pyarrow, the features
scaled and passed through a Linear(features, 2) in torch, softmax, and the kept label, the class
index and the probabilities written with pyarrow's ParquetWriter (one output file per input
file, default options). What a user would write by hand; raytrain predict writes the same
columns. Prints one JSON line: {"rows": n, "seconds": s, "peak_rss_mb": m}.
"""

import json
import os
import resource
import sys
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import torch

data, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
files = sorted(f for f in os.listdir(data) if f.endswith(".parquet"))
width = pq.read_schema(os.path.join(data, files[0])).field("x").type.list_size
torch.manual_seed(0)
model = torch.nn.Linear(width, 2).eval()
mean, std = torch.zeros(width), torch.ones(width)
os.makedirs(out, exist_ok=True)
rows = 0
started = time.perf_counter()
for name in files:
    reader = pq.ParquetFile(os.path.join(data, name))
    writer = None
    for part in reader.iter_batches(batch_size=batch, columns=["x", "y"], use_threads=False):
        x = torch.from_numpy(part.column(0).flatten().to_numpy().reshape(-1, width))
        with torch.no_grad():
            probabilities = torch.softmax(model((x - mean) / std), dim=1).numpy()
        table = pa.table(
            {
                "y": part.column(1),
                "prediction": pa.array(probabilities.argmax(axis=1)),
                "probabilities": pa.FixedSizeListArray.from_arrays(
                    pa.array(probabilities.reshape(-1)), 2
                ),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(os.path.join(out, name), table.schema)
        writer.write_table(table)
        rows += len(table)
    writer.close()
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mb": peak}))
