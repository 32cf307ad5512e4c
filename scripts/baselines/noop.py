"""Ray Train's fixed cost: the same TorchTrainer set-up as raytrain (embedded Ray with the same
settings, the same worker count and CPUs), whose loop does nothing but report once.

    python noop.py WORKERS          # the floor
    python noop.py WORKERS ddp      # the floor of a DDP program: the loop also builds the tutorial's
                                    # model, wraps it in DDP and makes its optimizer, then reports
"""  # noqa: E501

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


def loop(config):
    if config["ddp"]:
        model = ray.train.torch.prepare_model(torch.nn.Linear(10, 2))
        torch.optim.SGD(model.parameters(), lr=0.01)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["stamp"], "w") as f:
            f.write(str(time.time()))
    ray.train.report({})


workers = int(sys.argv[1])
cfg = config.load(flags={"scaling.workers": workers})
with cluster.connect(cfg) as plan:
    trainer = TorchTrainer(
        loop,
        train_loop_config={"stamp": STAMP, "ddp": sys.argv[2:] == ["ddp"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.workers,
            use_gpu=False,
            resources_per_worker={"CPU": plan.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            storage_path=tempfile.mkdtemp(prefix="raytrain-noop-"),
            logging_config=ray.train.LoggingConfig("ERROR"),
        ),
    )
    trainer.fit()
with open(STAMP) as f:
    print(f'BENCH {{"first_step_at": {float(f.read())}}}', flush=True)
os.unlink(STAMP)
