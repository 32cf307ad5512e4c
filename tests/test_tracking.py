"""Runs tracked in MLflow: a real tracking server (mlflow server, SQLite, served artifacts) on
127.0.0.1, started and stopped by the test; what a run logged read back with MlflowClient."""

from __future__ import annotations

import pytest

from raytrain.tracking import TrackingError
from tests.s3server import free_port

pytestmark = pytest.mark.ray


def test_a_run_logs_its_config_epochs_results_and_best_checkpoint(train, mlflow_server):
    from mlflow.tracking import MlflowClient

    run = train(
        f"run.mlflow.tracking_uri={mlflow_server.url}",
        "run.mlflow.experiment=single",
        "train.epochs=2",
        "train.lr=0.05",
        report=True,
    )
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("single")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.run_dir.name and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.05" and found.data.params["scaling.workers"] == "2"
    history = client.get_metric_history(found.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [
        (row["epoch"], row["val_loss"]) for row in run.metrics
    ]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "report.png", "report.html", "best_checkpoint"} <= artifacts
    kept = {a.path for a in client.list_artifacts(found.info.run_id, "best_checkpoint")}
    assert kept == {"best_checkpoint/state.pt", "best_checkpoint/meta.json"}


def test_a_tracking_server_that_does_not_answer_is_one_line(train):
    with pytest.raises(TrackingError, match="MLflow at 'http://127.0.0.1:.*' cannot be used"):
        train(f"run.mlflow.tracking_uri=http://127.0.0.1:{free_port()}", "train.epochs=1")
