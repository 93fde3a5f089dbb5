"""A raytorch driver of its own (its own Ray job, named), held at a gate mid-run: run by
tests/test_dashboard.py while it looks at Ray's state API, the dashboard and Prometheus.

    python tests/gated_job.py ADDRESS GATE_DIR OUTPUT_DIR

Replicas wait at their 5th step while GATE_DIR/hold exists (see faults.Gate). Prints the run's
JSON summary last.
"""

import json
import sys
from functools import partial

import torch.nn.functional as F

from faults import Gated
from raytorch import TrainConfig, Trainer
from raytorch.tasks.builtin import linear_data


def main(address: str, gate: str, output_dir: str) -> None:
    config = TrainConfig(workers=2, epochs=2, batch_size=16, lr=1e-4, optimizer="sgd", address=address,
                         output_dir=output_dir, log_every=5)
    result = Trainer(config, model_fn=partial(Gated, gate, 5), dataset_fn=partial(linear_data, 320, 0),
                     loss_fn=F.mse_loss).fit()
    print(json.dumps({"epoch_losses": result.epoch_losses, "steps": result.steps, "samples": result.samples}))


if __name__ == "__main__":
    main(*sys.argv[1:])
