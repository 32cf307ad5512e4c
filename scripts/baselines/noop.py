"""Ray Train's fixed cost: the same TorchTrainer set-up as raytrain (embedded Ray with the same
settings, the same worker count and CPUs), whose loop does nothing of raytrain's.

    python noop.py WORKERS          # the floor: the loop only reports once
    python noop.py WORKERS ddp      # the floor of a DDP program: the loop also builds the tutorial's
                                    # model, wraps it in DDP and makes its optimizer, then reports
    python noop.py WORKERS train WORKLOAD CPUS
                                    # the floor of training inside Ray Train: each worker (CPUS
                                    # cores, as many torch threads) runs plain.py's loop (ddp.py's
                                    # with several workers) on WORKLOAD, then reports once
"""  # noqa: E501

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from raytrain import cluster, config  # noqa: E402

STAMP = tempfile.mktemp(prefix="raytrain-noop-first-step-")
HERE = os.path.dirname(os.path.abspath(__file__))


def train_as_plain(workload: str, cpus: int) -> dict:
    """plain.py's loop (ddp.py's on several workers) in this worker: its BENCH result."""
    sys.path.insert(0, HERE)
    from common import WORKLOADS, train_share

    torch.set_num_threads(cpus)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    return train_share(WORKLOADS[workload], rank, world, ray.train.torch.prepare_model)


def loop(config):
    result = {}
    if config["mode"] == "ddp":
        model = ray.train.torch.prepare_model(torch.nn.Linear(10, 2))
        torch.optim.SGD(model.parameters(), lr=0.01)
    elif config["mode"] == "train":
        result = train_as_plain(config["workload"], config["cpus"])
    if ray.train.get_context().get_world_rank() == 0:
        result.setdefault("first_step_at", time.time())
        with open(config["stamp"], "w") as f:
            f.write(json.dumps(result))
    ray.train.report({})


workers = int(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else "noop"
workload, cpus = (sys.argv[3], int(sys.argv[4])) if mode == "train" else (None, 1)
flags = {"scaling.workers": workers}
if mode == "train":
    flags["scaling.cpus_per_worker"] = cpus
cfg = config.load(flags=flags)
with cluster.connect(cfg) as plan, tempfile.TemporaryDirectory(prefix="raytrain-noop-") as runs:
    trainer = TorchTrainer(
        loop,
        train_loop_config={"stamp": STAMP, "mode": mode, "workload": workload, "cpus": cpus},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=False,
            resources_per_worker={"CPU": plan.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            storage_path=runs,
            logging_config=ray.train.LoggingConfig("ERROR"),
        ),
    )
    trainer.fit()
with open(STAMP) as f:
    print("BENCH " + f.read(), flush=True)
os.unlink(STAMP)
