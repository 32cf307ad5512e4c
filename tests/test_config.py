"""Configuration: defaults, precedence, and every bad input as a one-line error with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from raytrain import config
from raytrain.commands import args as cli_args
from raytrain.commands import train as train_command
from raytrain.commands.train import main
from raytrain.config import Config
from raytrain.errors import EXIT_USAGE

from .conftest import ROOT


def test_defaults_reproduce_the_tutorial():
    cfg = Config()
    assert (cfg.data.samples, cfg.data.features, cfg.data.classes) == (1000, 10, 2)
    assert cfg.model.name == "simple"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.momentum) == (
        0.01,
        32,
        10,
        0.0,
    )
    assert cfg.data.val_fraction == 0.2


def test_shipped_config_files_load():
    assert config.load(ROOT / "configs/default.yaml") == Config()
    seed = config.load(ROOT / "configs/seed.yaml")
    assert seed.data.labels == "random" and seed.model.name == "simple"
    tabular = config.load(ROOT / "configs/tabular.yaml")
    assert (tabular.train.optimizer, tabular.train.scheduler) == ("adamw", "cosine")
    assert tabular.train.early_stopping.patience and tabular.data.normalize == "standard"


def test_default_yaml_lists_every_field_of_the_schema_with_its_default():
    import yaml

    written = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    defaults = Config().to_dict()
    assert list(written) == list(defaults)
    for section, fields in defaults.items():
        assert list(written[section]) == list(fields), section
        for name, value in fields.items():
            given = written[section][name]
            assert (list(given) if isinstance(given, list) else given) == value, (section, name)


def _numeric_fields(prefix="", model=Config):
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if hasattr(field.annotation, "model_fields"):
            yield from _numeric_fields(f"{dotted}.", field.annotation)
            continue
        kind = str(field.annotation)
        if "float" in kind or "int" in kind:
            yield dotted, "float" in kind


@pytest.mark.parametrize(("dotted", "is_float"), list(_numeric_fields()))
def test_every_numeric_field_refuses_values_torch_cannot_take(dotted, is_float, capsys, tmp_path):
    """Not finite, or below what the field allows: one line before anything starts."""
    bad = ["inf", "-inf", "nan", "-1"] if is_float else ["-1", "1.5", "inf"]
    if dotted.endswith(".seed"):
        bad.append(str(2**63))
    for value in bad:
        assert main(["--set", f"{dotted}={value}", "--storage-path", str(tmp_path)]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.startswith(f"raytrain: error: invalid value for {dotted}") or (
            dotted == "scaling.workers" and "scaling.workers" in err
        ), (value, err)
        assert err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_precedence_flags_over_set_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  epochs: 3\n  batch_size: 64\nscaling:\n  workers: 3\n")
    cfg = config.load(
        path,
        ["train.epochs=4", "train.batch_size=16", "model.hidden=[8, 8]"],
        {"train.batch_size": 8, "scaling.workers": None},
    )
    assert cfg.train.lr == 0.5  # file over default
    assert cfg.train.epochs == 4  # --set over file
    assert cfg.train.batch_size == 8  # flag over --set
    assert cfg.scaling.workers == 3  # a flag left unset changes nothing
    assert cfg.model.hidden == (8, 8)
    assert cfg.train.momentum == 0.0  # default


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        Config().train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--workers", "0"], ["scaling.workers", "0"]),
        (["--batch-size", "0"], ["train.batch_size", "0"]),
        (["--batch-size", "3", "--workers", "4"], ["train.batch_size", "3", "4"]),
        (["--lr", "0"], ["train.lr", "0"]),
        (["--lr", "-0.1"], ["train.lr", "-0.1"]),
        (["--lr", "inf"], ["train.lr", "inf", "finite"]),
        (["--set", "train.optimizer=lion"], ["train.optimizer", "lion", "sgd"]),
        (["--set", "train.warmup_epochs=-1"], ["train.warmup_epochs", "-1"]),
        (["--set", "train.warmup_epochs=10"], ["train.warmup_epochs = 10", "10 epochs"]),
        (["--set", "train.nesterov=true"], ["train.nesterov", "momentum"]),
        (["--set", "train.grad_clip=0"], ["train.grad_clip", "0"]),
        (["--set", "train.gamma=1.5"], ["train.gamma", "1.5"]),
        (["--set", "train.early_stopping.patience=-1"], ["train.early_stopping.patience", "-1"]),
        (["--set", "train.early_stopping.min_delta=-0.1"], ["min_delta", "-0.1"]),
        (["--set", "run.checkpoint_metric=f1"], ["run.checkpoint_metric", "f1", "val_loss"]),
        (["--set", "data.normalize=minmax"], ["data.normalize", "minmax", "standard"]),
        (["--seed", "-1"], ["train.seed", "-1"]),
        (["--workers", "two"], ["scaling.workers", "two", "MIN-MAX"]),
        (["--workers", "4-2"], ["min_workers", "4", "MIN <= MAX"]),
        (["--epochs", "0"], ["train.epochs", "0"]),
        (["--set", "train.lr_schedule=cosine"], ["train.lr_schedule", "lr"]),
        (["--set", "trian.lr=0.1"], ["trian", "train"]),
        (["--set", "train.epochs=ten"], ["train.epochs", "ten"]),
        (["--set", "train.epochs=2.5"], ["train.epochs", "2.5"]),
        (["--set", "model.name=resnet"], ["model.name", "resnet", "simple"]),
        (["--set", "lr=0.1"], ["lr"]),
        (["--set", "train.lr"], ["train.lr"]),
        (["--config", "/nonexistent/raytrain.yaml"], ["/nonexistent/raytrain.yaml"]),
        (["--name", "a/b"], ["run.name", "a/b"]),
    ],
)
def test_bad_input_is_one_clear_line(argv, names, capsys, tmp_path):
    code = main([*argv, "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith("raytrain: error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("train: [1, 2\n", ["not valid YAML", "line"]),
        ("- just\n- a list\n", ["mapping"]),
        ("train: 5\n", ["train", "mapping"]),
        ("train:\n  epochs: three\n", ["train.epochs", "three"]),
    ],
)
def test_malformed_config_file(text, names, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--config", str(path), "--storage-path", str(tmp_path / "r")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for name in names:
        assert name in err, err


def test_unwritable_storage_path(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["--storage-path", str(blocker / "runs")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "run.storage_path" in err and str(blocker) in err and err.count("\n") == 1


def test_existing_run_name_is_refused_and_left_alone(capsys, tmp_path):
    run = tmp_path / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("precious")
    assert main(["--storage-path", str(tmp_path / "runs"), "--name", "taken"]) == EXIT_USAGE
    assert "'taken' already exists" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain.main", "--workers", "0", "--storage-path", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "raytrain: error: invalid value for scaling.workers: 0 "
        "(input should be greater than or equal to 1)"
    ]


def test_cluster_launcher_config_is_valid_yaml_with_the_needed_keys():
    import yaml

    launcher = yaml.safe_load((ROOT / "configs/cluster.yaml").read_text())
    needed = [
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ]
    for key in needed:
        assert key in launcher, key
    assert launcher["head_node_type"] in launcher["available_node_types"]
    for node_type in launcher["available_node_types"].values():
        assert "GPU" not in node_type["resources"]
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])
    assert any("torch" in c and "cpu" in c for c in launcher["setup_commands"])


def test_kuberay_rayjob_manifest_is_valid_yaml_with_the_needed_keys():
    import yaml

    job = yaml.safe_load((ROOT / "configs/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m raytrain.main")
    assert "--address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert "headGroupSpec" in cluster and cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    # The entrypoint must parse as raytrain flags, into a valid config.
    args = train_command.build_parser("raytrain train").parse_args(spec["entrypoint"].split()[3:])
    cfg = config.load(args.config, args.set, cli_args.config_flags(args))
    assert cfg.run.address == "auto" and cfg.scaling.workers > 1
