"""The CLI: plugins listing, short names in configs, dotlist overrides, every experiment config exercised."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TINY_DATA, read_metrics, run_main
from retrieval_lightning.cli import run_lightning_cli
from retrieval_lightning.registry import HEADS

#: recipe stages that start from an earlier stage's checkpoint (``init_from: null  # REQUIRED``): they
#: freeze heads that stage trained, and ``fit`` refuses frozen heads nothing has loaded
STAGE_BEFORE = {
    "cvnet_r50_gldv2": "cvnet_r50_gldv2_global",
    "cvnet_ds_r50_gldv2": "cvnet_r50_gldv2",
    "cvnet_ds_demo": "cvnet_demo",
}


def _stage_depth(stem: str) -> int:
    return 1 + _stage_depth(STAGE_BEFORE[stem]) if stem in STAGE_BEFORE else 0


#: earlier recipe stages first: a later stage's test starts from the checkpoint its earlier stage's test fitted
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"), key=lambda c: (_stage_depth(c.stem), c.stem))


def test_plugins_command_lists_heads_and_datamodules(tmp_path: Path) -> None:
    out = run_main(["plugins"], cwd=tmp_path).stdout
    lines = {line.split()[1]: line.split() for line in out.splitlines()[1:]
             if line.strip() and not line.startswith(" ")}
    assert lines["gem_arcface"][:3] == ["head", "gem_arcface", "global"]
    for name in ("minilandmarks", "gldv2", "revisitop"):
        assert lines[name][0] == "datamodule" and lines[name][3] == "retrieval-lightning"


def test_short_names_and_dotlist_override(cache_root: Path, tmp_path: Path) -> None:
    cli = run_lightning_cli(
        ["--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}",
         "--model.heads.global.init_args.margin_m=0.2", "--model.optim.lr=0.5", *TINY_DATA,
         "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    head = cli.model.heads["global"]
    assert isinstance(head, HEADS.get("gem_arcface"))
    assert head.margin_m == 0.2 and head.margin.margin == 0.2
    assert cli.model.optim.lr == 0.5
    assert cli.model.num_classes == cli.datamodule.num_classes > 1  # linked from the datamodule
    assert head.classifier.weight.shape[0] == cli.model.num_classes


def _overrides_for(config: Path, cache_root: Path, tmp_path: Path) -> list[str]:
    raw = yaml.safe_load(config.read_text())
    data = raw["data"]["class_path"]
    backbone_args = raw["model"]["backbone"].get("init_args", {})
    if str(backbone_args.get("name", "")).startswith("resnet"):
        # ResNet recipes (pre-activation taps exist on timm ResNets only; a later stage must fit the
        # earlier one's checkpoint): the smallest ResNet, randomly initialised
        backbone = ["--model.backbone.init_args.name=resnet18", "--model.backbone.init_args.weights=null"]
    else:
        backbone = ["--model.backbone.init_args.name=efficientnet_lite0",
                    "--model.backbone.init_args.weights=efficientnet_lite0_package"]
    # one global scale, a two-level local pyramid and a short pair epoch: the configs' settings are parsed
    # and built as written; the multi-scale paths are tested in test_scale_resize.py / test_delg_local.py
    small = [f"--model.heads.{role}.init_args.scales=[0.7071,1.0]"
             for role, head in raw["model"]["heads"].items() if head["class_path"] == "delg_local"]
    pairs = (raw["data"].get("init_args") or {}).get("pairs") or {}
    if pairs.get("groups_per_epoch"):  # a GLDv2-sized epoch's group list (100k draws) for a one-step run
        small.append("--data.init_args.pairs.groups_per_epoch=64")
    common = [*backbone, "--model.eval_scales=[1.0]", *small,
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=retrieval_lightning.callbacks.MetricsToJson",
        f"--trainer.callbacks.output_dir={tmp_path}/metrics",
    ]
    if data == "minilandmarks":
        return common + [f"--data.init_args.root={cache_root}", *TINY_DATA]
    from datamodules.minilandmarks import MiniLandmarksDataModule

    built = MiniLandmarksDataModule(root=str(cache_root), build_size=128).dataset_dir
    if data == "gldv2":
        return common + [f"--data.init_args.root={built / 'gldv2'}", "--data.init_args.image_size=96",
                         "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
                         "--data.init_args.eval_max_side=96", "--data.init_args.test_sets=[holdout]"]
    if data == "revisitop":
        return common + [f"--data.init_args.root={built / 'revisitop'}", "--data.init_args.datasets=[minilandmarks]",
                         "--data.init_args.max_side=96", "--data.init_args.num_workers=0"]
    raise AssertionError(f"{config.name}: no test overrides for datamodule {data!r}; add them here")


_STAGE_INIT: dict[str, list[str]] = {}  # stage -> its init_from override, fitted once per test session


def _serves_later_stages(stem: str, checkpoint: Path) -> None:
    """``checkpoint`` (of stage ``stem``, fitted as its config says) is where the stages after it start."""
    for later, before in STAGE_BEFORE.items():
        if before == stem:
            _STAGE_INIT.setdefault(later, [f"--model.init_from={checkpoint}"])


def _stage_checkpoint(stem: str, cache_root: Path, tmp_path: Path) -> list[str]:
    """``--model.init_from`` of the stage before ``stem`` (fitted one step here, once), or nothing."""
    if stem not in STAGE_BEFORE:
        return []
    if stem not in _STAGE_INIT:
        _STAGE_INIT[stem] = _fit_stage_before(stem, cache_root, tmp_path)
    return _STAGE_INIT[stem]


def _fit_stage_before(stem: str, cache_root: Path, tmp_path: Path) -> list[str]:
    before = REPO / "experiments" / f"{STAGE_BEFORE[stem]}.yaml"
    work = tmp_path / before.stem
    work.mkdir(parents=True)
    overrides = _overrides_for(before, cache_root, work) + _stage_checkpoint(before.stem, cache_root, work / "earlier")
    run_main(["fit", "--config", str(before), *overrides], cwd=work)
    last = work / "checkpoints" / "last.ckpt"  # where the stage config's header tells the user to look
    assert last.is_file(), f"{before.name}: fit wrote {sorted(work.rglob('*.ckpt'))}, no {last}"
    return [f"--model.init_from={last}"]


@pytest.mark.slow
@pytest.mark.parametrize("config", EXPERIMENTS, ids=[c.stem for c in EXPERIMENTS])
def test_every_experiment_config_runs_one_step_and_tests(config: Path, cache_root: Path, tmp_path: Path) -> None:
    """Each config as a user runs it: a later recipe stage starts from its earlier stage's checkpoint."""
    overrides = _overrides_for(config, cache_root, tmp_path) + _stage_checkpoint(config.stem, cache_root, tmp_path)
    data = yaml.safe_load(config.read_text())["data"]["class_path"]
    if data != "revisitop":  # revisitop is evaluation-only
        run_main(["fit", "--config", str(config), *overrides], cwd=tmp_path)
        # every training config resumes (`--ckpt_path last`) and logs under the run's directory
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file(), sorted(tmp_path.rglob("*.ckpt"))
        assert (tmp_path / "wandb").is_dir()
        _serves_later_stages(config.stem, tmp_path / "checkpoints" / "last.ckpt")
    run_main(["test", "--config", str(config), *overrides], cwd=tmp_path)
    metrics = read_metrics(tmp_path / "metrics", "test")
    assert metrics, f"{config.name}: no test metrics"
    assert all(0.0 <= v <= 100.0 for v in metrics.values()), metrics
    # a checkpoint's monitored metric must be one validation logs (here: its test twin, the same eval set),
    # or the run dies at its first validation
    for monitor in _monitored(config):
        assert monitor.replace("val/", "test/", 1) in metrics, (config.name, monitor, sorted(metrics))


def _monitored(config: Path) -> list[str]:
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    return [cb["init_args"]["monitor"] for cb in callbacks if (cb.get("init_args") or {}).get("monitor")]


def test_ckpt_path_gives_weights_and_the_config_gives_settings(cache_root: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Lightning would re-parse ``--ckpt_path``'s hyper-parameters over the config file and the command
    line (not the heads: they are modules); here the config and command line apply, and the settings
    that differ from the checkpoint's are listed."""
    import logging

    import torch

    from retrieval_lightning.trainer import RetrievalTrainer

    base = ["--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}", *TINY_DATA,
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    model = run_lightning_cli([*base, "--model.eval_scales=[1.0]", "--model.rerank.k=7"], run=False).model
    ckpt = tmp_path / "trained.ckpt"
    from retrieval_lightning.checkpoints import ARCHITECTURE_KEY
    from retrieval_lightning.model_record import architecture_of

    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                ARCHITECTURE_KEY: architecture_of(model)}, ckpt)

    tested = []
    monkeypatch.setattr(RetrievalTrainer, "test", lambda self, model, **kwargs: tested.append(model))
    with caplog.at_level(logging.INFO):
        run_main(["test", *base, "--model.rerank.k=3", "--model.optim.lr=0.5", f"--ckpt_path={ckpt}",
                  "--model.heads.global.init_args.margin_m=0.2"], cwd=tmp_path)
    assert tested[0].rerank.k == 3  # the command line, not the checkpoint's 7
    assert list(tested[0].eval_scales) == [0.7071, 1.0, 1.4142]  # the config file, not the checkpoint's [1.0]
    note = [r.getMessage() for r in caplog.records if "--ckpt_path" in r.getMessage()]
    assert len(note) == 1, note
    assert "model.eval_scales: [1.0] -> [0.7071, 1.0, 1.4142]" in note[0] and "model.rerank.k: 7 -> 3" in note[0]
    assert "optim" not in note[0]  # only training reads it: no news to `test`
    # heads are modules, not hyper-parameters: their arguments are compared through the architecture record
    assert "model.heads.global.init_args.margin_m: 0.1 -> 0.2" in note[0]
    assert "init_args.weights" not in note[0] and "class_path" not in note[0]  # weights: the checkpoint's
    # a checkpoint of `import-checkpoint` holds its architecture record alone (no hyper_parameters): listed too
    torch.save({"state_dict": model.state_dict(), ARCHITECTURE_KEY: architecture_of(model)}, ckpt)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_main(["test", *base, "--model.rerank.k=3", f"--ckpt_path={ckpt}"], cwd=tmp_path)
    note = [r.getMessage() for r in caplog.records if "--ckpt_path" in r.getMessage()]
    assert len(note) == 1 and "model.rerank.k: 7 -> 3" in note[0] and "eval_scales: [1.0] ->" in note[0], note


def test_a_changed_head_class_is_shown_by_its_registry_name() -> None:
    """Not by the alias module's import path that the parsed config holds."""
    from retrieval_lightning.cli import model_setting_changes

    alias = "retrieval_lightning.head_plugins."
    changed = model_setting_changes({"heads": {"verifier": {"class_path": "meancos_verifier"}}},
                                    {"heads": {"verifier": {"class_path": alias + "colshape_verifier"}}})
    assert changed == ["model.heads.verifier.class_path: 'meancos_verifier' -> 'colshape_verifier'"]
    assert model_setting_changes({"heads": {"verifier": {"class_path": "cvnet_verifier"}}},
                                 {"heads": {"verifier": {"class_path": alias + "cvnet_verifier"}}}) == []


def test_predict_without_a_writer_says_where_descriptors_are_written(cache_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="predict writes nothing without a prediction-writer callback.*extract"):
        run_main(["predict", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}",
                  *TINY_DATA, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.limit_predict_batches=1"], cwd=tmp_path)


def test_short_config_flag_names_plugins_too(tmp_path: Path) -> None:
    """``-c`` is LightningCLI's ``--config``: its file's short plugin names must be imported as well."""
    from retrieval_lightning.cli_args import plugin_names_used

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  heads:\n    global:\n      class_path: gem_arcface\n"
                      "data:\n  class_path: minilandmarks\n")
    for args in (["fit", "-c", str(config)], ["fit", f"-c={config}"], ["fit", f"-c{config}"],
                 ["fit", "--config", str(config)]):
        used = plugin_names_used(args)
        assert "gem_arcface" in str(used["heads"]) and "minilandmarks" in str(used["datamodules"]), (args, used)


def test_finetune_checks_the_resume_first_and_needs_test_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune settles what it resumes (and continues that W&B run) before its first test creates a run,
    and refuses to train when there are no test metrics to compare."""
    from retrieval_lightning.errors import UsageError
    from retrieval_lightning.trainer import RetrievalTrainer

    calls: list[str] = []
    monkeypatch.setattr(RetrievalTrainer, "_checked_resume", lambda self, model, path: calls.append("resume") or path)
    monkeypatch.setattr(RetrievalTrainer, "test", lambda self, *a, **k: calls.append("test") or [])
    monkeypatch.setattr(RetrievalTrainer, "fit", lambda self, *a, **k: calls.append("fit"))
    trainer = RetrievalTrainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(UsageError, match="no test eval set"):
        trainer.finetune(object())
    assert calls == ["resume", "test"]  # and never trained
    partial = RetrievalTrainer(logger=False, enable_checkpointing=False, accelerator="cpu", limit_test_batches=0.5)
    with pytest.raises(UsageError, match=r"--trainer.limit_test_batches=0.5 evaluates the test sets in part"):
        partial.finetune(object())  # the cause named, not a missing test set


def test_an_unknown_command_lists_every_command_and_the_closest(tmp_path: Path) -> None:
    """Commands outside LightningCLI's parser (search, match, download...) are listed too, here and in --help."""
    done = run_main(["serch"], cwd=tmp_path, status=2)
    assert "unknown command 'serch'; did you mean 'search'?" in done.stderr
    assert all(name in done.stderr for name in ("fit", "finetune", "extract", "plugins", "match", "import-checkpoint"))
    from retrieval_lightning.cli import _other_commands_help

    assert "import-checkpoint" in _other_commands_help() and "download" in _other_commands_help()


def test_the_help_hint_names_the_subcommand_whose_options_are_missing() -> None:
    """A subcommand's missing options are raised by the top parser (the hint adds the subcommand); a file or a
    value named ``test.*`` in another message made the hint ``fit test --help``, a command that does not exist."""
    from types import SimpleNamespace

    from retrieval_lightning.cli_errors import _help_command

    top, fit = SimpleNamespace(prog="retrieval-lightning"), SimpleNamespace(prog="retrieval-lightning fit")
    assert _help_command(top, "the following arguments are required: test.model.backbone, test.model.heads") == (
        "retrieval-lightning test")
    assert _help_command(fit, "Parser key \"config\": File does not exist: '/tmp/cfg/test.yamlx'") == (
        "retrieval-lightning fit")
    assert _help_command(fit, 'Parser key "trainer.max_epochs": Got value: test.x') == "retrieval-lightning fit"
    assert _help_command(top, "File does not exist: '/tmp/cfg/validate.yaml'") == "retrieval-lightning"


def test_version_names_the_package_and_the_libraries_behind_the_numbers(capsys: pytest.CaptureFixture) -> None:
    """``--version`` (a bug report's first line) was refused as an unknown option."""
    import lightning
    import torch

    from retrieval_lightning.cli import main

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith("retrieval-lightning 0.") and f"torch {torch.__version__.split('+')[0]}" in line
        assert f"lightning {lightning.__version__}" in line and "timm " in line, line


@pytest.mark.parametrize(("option", "said"), [
    (["--trainer.max_stepz", "3"], "error: unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"),
    # a list item by index (the error said "did you mean --trainer.callbacks?", the option it had given)
    (["--trainer.callbacks[0].init_args.every_n_train_steps=2"],
     "error: unknown option --trainer.callbacks[0].init_args.every_n_train_steps: list items are not indexed on the "
     "command line (--trainer.callbacks+=<class> appends one, --trainer.callbacks.<argument>=<value> reaches the last "
     "one only): to change another, edit the config"),
    (["--model.optim.lrr", "0.1"], "error: model.optim: unknown option 'lrr'; did you mean 'lr'?"),
    # The datamodule's class is only known from its class_path: its parameters come from the plugin named there.
    (["--data.init_args.eval_batch_sise", "3"],
     "error: data: unknown option 'eval_batch_sise'; did you mean 'eval_batch_size'?"),
    (["--model.heads.global.init_args.marginn", "0.2"],
     "error: model.heads: unknown option 'marginn'; did you mean 'margin'?"),
    # a value of the wrong type, nested: the option's path, the class and the reason (not cut at the class)
    (["--model.heads.global.init_args.p", "abc"],
     "error: model.heads (gem_arcface), p: expected float. Got value: abc"),
    (["--data.init_args.pairs.negatives", "x"],
     "error: data (minilandmarks), pairs, negatives: expected int. Got value: x"),
    (["--data.init_args.pairs.crops_per_image", "x"],  # an optional option: the types of the Union it tried
     "error: data (minilandmarks), pairs, crops_per_image: expected int (or null). Got value: x"),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpont"],  # was "not any of the Union subtypes"
     "error: trainer.callbacks: class_path 'lightning.pytorch.callbacks.ModelCheckpont' cannot be imported (module "
     "'lightning.pytorch.callbacks' has no attribute 'ModelCheckpont'); did you mean "
     "'lightning.pytorch.callbacks.ModelCheckpoint'?"),
])
def test_a_misspelled_option_is_one_line_with_the_closest(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          option: list[str], said: str) -> None:
    """Not the whole usage text, nor the union types jsonargparse tried."""
    from retrieval_lightning.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "experiments/demo.yaml"), *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == said and len(err) == 2 and "usage:" not in err[1]


def test_a_config_that_is_not_yaml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  heads:\n    global:\n      class_path: gem_arcface\n     init_args: {}\n")
    done = run_main(["fit", "--config", str(bad)], cwd=tmp_path, status=2)
    assert done.stderr.startswith(f"error: config file {bad} is not valid YAML") and "line 5, column 6" in done.stderr


def test_an_image_error_raised_in_a_loader_worker_prints_its_own_message(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch re-raises a worker's exception with the worker's whole traceback as its message."""
    import retrieval_lightning.cli as cli
    from torch._utils import ExceptionWrapper

    from retrieval_lightning.data.io import ImageLoadError

    def dispatch(argv: list[str]) -> int:
        try:
            raise ImageLoadError("/data/x.jpg", "file not found")
        except ImageLoadError:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
        wrapped.reraise()
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    done = run_main(["test"], cwd=tmp_path, status=2)
    assert done.stderr.splitlines()[0] == "error: cannot load image '/data/x.jpg': file not found"


def test_an_error_that_stops_a_progress_bar_starts_its_own_line(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Lightning's bar is left open when an error stops a loop: the error line was printed onto it."""
    from tqdm.std import tqdm

    from retrieval_lightning import cli
    from retrieval_lightning.errors import UsageError

    bars: list[tqdm] = []

    def fail(argv: list[str]) -> int:
        bars.append(tqdm(total=4, desc="Testing DataLoader 0"))
        bars[0].update(1)
        raise UsageError("the head returned NaN")

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["test"]) == 2
    bars[0].close()
    err = capsys.readouterr().err
    assert "\nerror: the head returned NaN" in err and "Testing DataLoader 0" in err


@pytest.mark.parametrize("error", ["misconfiguration", "file_exists"])
def test_lightnings_configuration_refusals_and_a_file_in_an_output_path_are_one_line(
        error: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A LearningRateMonitor with --trainer.logger=false (the DELG GLDv2 configs carry one), or a
    --trainer.default_root_dir that is a file: Lightning's refusals and mkdir's, printed as tracebacks."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from retrieval_lightning import cli

    def fail(argv: list[str]) -> int:
        if error == "misconfiguration":
            raise MisconfigurationException("Cannot use `LearningRateMonitor` callback with `Trainer` that has no "
                                            "logger.")
        (tmp_path / "root").write_text("x")
        (tmp_path / "root" / "sub").mkdir(parents=True)
        return 0

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["fit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert ("LearningRateMonitor" if error == "misconfiguration" else "root") in err


def test_dependency_notices_nobody_can_act_on_are_dropped_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's advertisement for its logger service and its pytree deprecation warning are printed on every
    run; the CLI drops those two and keeps Lightning's other lines and warnings."""
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from retrieval_lightning.cli import quiet_third_party_notices

    quiet_third_party_notices()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud logging ... try installing [litlogger]")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
        warnings.warn("The number of training batches (2) is smaller than the logging interval")
    assert [str(w.message)[:14] for w in caught] == ["The number of "]


def test_nccl_on_a_machine_without_gpus_falls_back_to_gloo(recwarn: pytest.WarningsRecorder) -> None:
    """--trainer.strategy.init_args.process_group_backend nccl (a GPU config) on a CPU machine: every rank's
    "ProcessGroupNCCL is only supported with GPUs" traceback before; gloo, said once, now."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from retrieval_lightning.cli import gloo_without_gpus

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="nccl"),
                         logger=False, enable_progress_bar=False)
    gloo_without_gpus(trainer)
    if torch.cuda.is_available():
        assert trainer.strategy.process_group_backend == "nccl"
    else:
        assert trainer.strategy.process_group_backend == "gloo"
        assert any("nccl needs GPUs" in str(w.message) for w in recwarn)


def test_an_accelerator_the_machine_lacks_is_named_with_what_it_has() -> None:
    """--trainer.accelerator gpu on a CPU machine said only "No supported gpu backend found!", and tpu was a
    torch_xla traceback; both name the setting and the machine's accelerators now. Other errors pass through."""
    import lightning.pytorch as pl
    import torch

    from retrieval_lightning.cli_errors import accelerator_refusal

    lacking = ["tpu"] + ["gpu"] * (not torch.cuda.is_available() and not torch.backends.mps.is_available())
    for accelerator in lacking:
        with pytest.raises(Exception) as caught:
            pl.Trainer(accelerator=accelerator, logger=False)
        refusal = accelerator_refusal(caught.value, {"trainer": {"accelerator": accelerator}})
        assert refusal is not None and str(refusal).startswith(f"--trainer.accelerator={accelerator}: ")
        assert "this machine has cpu" in str(refusal) and "\n" not in str(refusal)
    try:
        raise ValueError("a head's own refusal")
    except ValueError as exc:
        assert accelerator_refusal(exc, {"trainer": {"accelerator": "cpu"}}) is None


def test_a_configured_head_is_dropped_by_null(cache_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """``--model.heads.local=null``: a two-head evaluation config serves the model's one-head stage (the parser
    refused it as "unknown head 'null'"); the training settings naming the head go with it; DDP re-launches
    sys.argv, so the argument stays there."""
    from retrieval_lightning.cli import dump_options
    from retrieval_lightning.cli_args import PRINT_CONFIG_FLAGS, split_dropped_heads, without_print_config
    from retrieval_lightning.errors import UsageError

    args = ["test", "--model.heads.local=null", "--model.heads.verifier", "None", "--model.heads.global.init_args.p=3",
            "--model.heads", "{}", "--model.heads.x=gem_arcface"]
    assert split_dropped_heads(args) == (
        ["test", "--model.heads.global.init_args.p=3", "--model.heads", "{}", "--model.heads.x=gem_arcface"],
        ["local", "verifier"])
    base = ["--config", str(REPO / "experiments/delg_demo.yaml"), "--trainer.logger=false",
            f"--data.init_args.root={cache_root}", f"--trainer.default_root_dir={tmp_path}"]
    argv = sys.argv
    model = run_lightning_cli([*base, "--model.heads.local=null"], run=False).model
    assert sys.argv is argv
    assert list(model.heads) == ["global"] and model.loss_weights == {"global": 1.0} and not model.detach
    with pytest.raises(UsageError, match=r"--model.heads.verifier=null: no head 'verifier' is configured"):
        run_lightning_cli([*base, "--model.heads.verifier=null"], run=False)
    # --print_config (jsonargparse prints while parsing, before the drop; it was refused): printed without the
    # head and what names it, a config that runs as printed
    for flag in (["--print_config"], ["--print_config=skip_null"], ["--print_config", "skip_default"]):
        with pytest.raises(SystemExit) as exited:
            run_lightning_cli([*base, "--model.heads.local=null", *flag], run=False)
        assert exited.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert list(printed["model"]["heads"]) == ["global"], flag
        assert "local" not in str(printed["model"]["loss_weights"]) + str(printed["model"].get("detach")), flag
    assert "trainer" in printed and "data" in printed  # the whole command's config, not the model's alone
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    model = run_lightning_cli(["--config", str(tmp_path / "printed.yaml")], run=False).model
    assert list(model.heads) == ["global"] and model.loss_weights == {"global": 1.0}
    with pytest.raises(UsageError, match="--print_config: unknown flag 'skip_nul'"):
        run_lightning_cli([*base, "--model.heads.local=null", "--print_config=skip_nul"], run=False)
    try:
        import ruamel.yaml  # noqa: F401
    except ImportError:  # jsonargparse refuses `comments` too without it (here it was a traceback)
        assert "comments" not in PRINT_CONFIG_FLAGS
        with pytest.raises(UsageError, match="'comments' needs ruamel.yaml installed"):
            run_lightning_cli([*base, "--model.heads.local=null", "--print_config=comments"], run=False)
    assert without_print_config(["test", "--print_config", "skip_null,skip_default", "--x=1", "--print_config=a"]) == (
        ["test", "--x=1"], {"skip_null", "skip_default", "a"})
    assert without_print_config(["test", "--print_config", "--x", "y"]) == (["test", "--x", "y"], set())
    # jsonargparse renamed dump's options; setup.cfg allows versions that take only the earlier names

    def earlier_dump(cfg: object, format: str = "parser_mode", skip_none: bool = True, skip_default: bool = False,
                     skip_check: bool = False, yaml_comments: bool = False, skip_link_targets: bool = True) -> str:
        return ""

    assert dump_options(earlier_dump, skip_unset=True, skip_default=False, with_comments=False,
                        skip_validation=True) == {"skip_none": True, "skip_default": False, "yaml_comments": False,
                                                  "skip_check": True}


def test_cli_forms_a_code_read_found_refused_or_misreported(cache_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A config whose ``model`` is another file's path (a jsonargparse form) or whose heads are a list reached the
    plugin-name check as a traceback; a head set again after its ``=null`` was dropped anyway; a mistyped
    ``--ckpt_path`` without a model config was reported as missing model options; and a subcommand's missing
    options pointed at the top command's help, which does not list them."""
    from retrieval_lightning.checkpoints import CheckpointLoadError
    from retrieval_lightning.cli import main
    from retrieval_lightning.cli_args import plugin_names_used, split_dropped_heads

    nested = tmp_path / "nested.yaml"
    nested.write_text("model: other.yaml\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("model:\n  heads: [gem_arcface]\n")
    for config in (nested, listed):
        assert plugin_names_used(["fit", "--config", str(config)]) == {"heads": {}, "datamodules": {}}
    assert split_dropped_heads(["fit", "--model.heads.global=null", "--model.heads.global=gem_arcface"]) == (
        ["fit", "--model.heads.global=gem_arcface"], [])
    assert split_dropped_heads(["fit", "--model.heads.local=delg_local", "--model.heads.local", "null"])[1] == [
        "local"]  # null last: dropped after parsing
    data = ["--data=minilandmarks", f"--data.init_args.root={cache_root}", "--trainer.logger=false"]
    with pytest.raises(CheckpointLoadError, match=r"checkpoint not found: .*lats\.ckpt"):
        run_lightning_cli(["test", *data, f"--ckpt_path={tmp_path / 'lats.ckpt'}"])
    with pytest.raises(SystemExit) as exited:
        main(["test", *data])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "required: test.model.backbone" in err and "test --help)" in err, err


def test_short_plugin_names_inside_inline_mappings_and_plain_config_values(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--model.heads.verifier='{class_path: cvnet_verifier, ...}'`` (and the same for ``--data`` and a config's
    ``verifier: cvnet_verifier``) reached the parser without the plugin's alias: "Expected a dot import path
    string"; a misspelt name inside one was not named with the registry's suggestion."""
    from retrieval_lightning.cli import main
    from retrieval_lightning.cli_args import plugin_names_used
    config = tmp_path / "plain.yaml"
    config.write_text("model:\n  heads:\n    verifier: cvnet_verifier\ndata: minilandmarks\n")
    used = plugin_names_used([
        "test", "--config", str(config),
        "--model.heads.local={class_path: delg_local, init_args: {max_keypoints: 9}}",
        "--model.heads={global: gem_arcface, other: {class_path: gumbel_sparsifier}}",
        "--data", "{class_path: minilandmarks, init_args: {image_size: 64}}", "--model.heads.x={not yaml: [",
        "--model.heads.y={class_path: my_pkg.Head}"])
    assert used == {
        "heads": {f"model.heads.verifier.class_path ({config})": "cvnet_verifier",
                  "--model.heads.local": "delg_local", "--model.heads.global": "gem_arcface",
                  "--model.heads.other": "gumbel_sparsifier"},
        "datamodules": {f"data ({config})": "minilandmarks", "--data": "minilandmarks"}}
    base = ["--config", str(REPO / "experiments/demo.yaml"), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]
    model = run_lightning_cli([*base, "--model.heads.verifier={class_path: cvnet_verifier, init_args: "
                                      "{projection: identity}}"], run=False).model
    assert isinstance(model.heads["verifier"], HEADS.get("cvnet_verifier"))
    assert model.heads["verifier"].projection == "identity"  # the inline init_args reached the head
    assert main(["test", *base, "--model.heads.verifier={class_path: cvnet_verifer}"]) == 2
    err = capsys.readouterr().err
    assert "--model.heads.verifier: unknown head 'cvnet_verifer'; did you mean 'cvnet_verifier'" in err, err
    # `plugins` takes no arguments: its help says so, anything else is refused (it listed the plugins regardless)
    assert main(["plugins", "--help"]) == 0
    assert "takes no options" in capsys.readouterr().out
    assert main(["plugins", "--bogus"]) == 2
    assert "plugins takes no arguments, got '--bogus'" in capsys.readouterr().err


def test_a_saved_config_reruns_into_another_directory(cache_root: Path, tmp_path: Path) -> None:
    """The recipes derive the checkpoint folder and the logger's from ``${...default_root_dir}``; the saved config
    held them resolved, so ``fit --config <run a>/config.yaml --trainer.default_root_dir b`` resumed run a and
    overwrote its last.ckpt and config. The saved config keeps the recipe's templates; an unresolvable one is one
    line saying how to write it (it was a traceback)."""
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["--trainer.max_steps=1", "--trainer.logger=false", f"--data.init_args.root={cache_root}", *TINY_DATA]
    run_main(["fit", "--config", str(REPO / "experiments/demo.yaml"), *common,
              f"--trainer.default_root_dir={first}"], cwd=tmp_path)
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "${....default_root_dir}/checkpoints"
    before = (first / "checkpoints" / "last.ckpt").read_bytes()
    run_main(["fit", "--config", str(first / "config.yaml"), f"--trainer.default_root_dir={second}"], cwd=tmp_path)
    assert (second / "checkpoints" / "last.ckpt").is_file() and (second / "config.yaml").is_file()
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == before  # the first run is left as it was
    # an override replaces a template (a list whole, from a later file); one given as a template is kept
    from retrieval_lightning.callbacks.config import interpolation_templates

    recipe = str(REPO / "experiments/demo.yaml")
    templates = interpolation_templates(["fit", "--config", recipe, "--trainer.callbacks=[]",
                                         "--trainer.logger.init_args.save_dir", "${..x}"])
    assert templates == {("trainer", "logger", "init_args", "save_dir"): ("${..x}", {})}
    # (a review's cases) an override without `init_args.` replaces the template too; a config file after an
    # override wins over it; a second config file merges into the first, leaving its other templates in place
    logger_dir = ("trainer", "logger", "init_args", "save_dir")
    assert logger_dir not in interpolation_templates(["fit", "-c", recipe, "--trainer.logger.save_dir=/logs"])
    other = tmp_path / "other.yaml"
    other.write_text("trainer:\n  max_steps: 2\n  logger:\n    init_args:\n      save_dir: /from_other\n")
    later = interpolation_templates(["fit", "--config", recipe, "--trainer.logger.init_args.save_dir=${..y}",
                                     f"--config={other}"])
    assert logger_dir not in later and ("trainer", "callbacks", 0, "init_args", "dirpath") in later
    assert interpolation_templates(["fit", "--config", recipe, f"-c{other}"]).keys() == later.keys()
    done = run_main(["fit", "--config", str(REPO / "experiments/demo.yaml"), *common, "--print_config",
                     "--model.optim.warmup_steps=${trainer.max_steps}"], cwd=tmp_path, status=2)
    assert done.stderr.splitlines()[0].startswith("error: Interpolation key 'trainer.max_steps' not found. "), done
    assert "${fit.trainer.max_steps}" in done.stderr
