#!/usr/bin/env python3
"""A Ray Tune search over raytorch runs, from Python: the learning rate and batch size of the built-in
digits MLP, ASHA stopping the worse trials; each trial is one raytorch run of 2 replicas placed in
the trial's own resources, reporting every epoch with its checkpoint.

    python examples/tune_digits.py --trials 4
    # the same search from the CLI: raytorch tune --config examples/search.yaml
"""

import argparse

import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raytorch.group.cluster import ray_session
from raytorch.tasks.builtin import digits_data, mlp
from raytorch.tune import trainable


def model():
    return mlp(64, 10)


def train_set():
    return digits_data("train")


def eval_set():
    return digits_data("eval")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-concurrent", type=int, default=1)
    args = parser.parse_args()
    with ray_session():  # a local Ray on 127.0.0.1 (RAY_ADDRESS: a cluster)
        tuner = tune.Tuner(
            trainable(model_fn=model, dataset_fn=train_set, eval_dataset_fn=eval_set, loss_fn=F.cross_entropy,
                      workers=2, epochs=args.epochs, optimizer="adam"),
            param_space={"lr": tune.loguniform(1e-4, 3e-2), "batch_size": tune.choice([32, 64])},
            tune_config=tune.TuneConfig(metric="eval_loss", mode="min", num_samples=args.trials,
                                        scheduler=ASHAScheduler(grace_period=1),
                                        max_concurrent_trials=args.max_concurrent))
        best = tuner.fit().get_best_result()
    print(f"best trial: lr {best.config['lr']:.2e}, batch {best.config['batch_size']}: eval loss "
          f"{best.metrics['eval_loss']:.4f}, accuracy {best.metrics['eval_accuracy']:.1%}; "
          f"checkpoint {best.checkpoint}")
