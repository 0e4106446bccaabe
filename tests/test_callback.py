"""NTKMonitor in both Lightning namespaces: logging, actions, hooks, errors."""

from __future__ import annotations

import csv
import importlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_ntk import LinearizationBreakdownError, LinearizationBreakdownWarning, NTKReport
from tests._lightning_models import NAMESPACES, blobs, module_class, one_thread, trainer_kwargs  # noqa: F401

BREAK_AT_ONCE = {"relative_change": (1e-9, 1e-8)}


def monitor_cls(namespace: str) -> type:
    if namespace == "pytorch_lightning":
        from lightning_ntk import NTKMonitor

        return NTKMonitor
    from lightning_ntk.lightning import NTKMonitor

    return NTKMonitor


def fit(namespace: str, monitor, module_kwargs=None, **trainer_overrides):
    pl = importlib.import_module(namespace)
    pl.seed_everything(0, verbose=False)
    model = module_class(namespace)(**(module_kwargs or {}))
    trainer = pl.Trainer(callbacks=monitor, **trainer_kwargs(**trainer_overrides))
    trainer.fit(model)
    return trainer, model


def test_both_namespaces_are_one_implementation():
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor
    from lightning_ntk.lightning import NTKMonitor as LNTKMonitor
    from lightning_ntk.monitor.callback import NTKMonitorBase

    assert issubclass(NTKMonitor, pl.Callback) and not issubclass(NTKMonitor, L.Callback)
    assert issubclass(LNTKMonitor, L.Callback) and not issubclass(LNTKMonitor, pl.Callback)
    assert NTKMonitor.__init__ is LNTKMonitor.__init__ is NTKMonitorBase.__init__
    assert NTKMonitor.__module__ == "lightning_ntk.monitor.callback"
    assert LNTKMonitor.__module__ == "lightning_ntk.lightning"


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("as_list", [False, True])
def test_every_report_reaches_the_loggers(namespace, as_list, tmp_path):
    pl = importlib.import_module(namespace)
    monitor = monitor_cls(namespace)(n_probe=9, log_base=2)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer, _ = fit(
        namespace,
        [monitor] if as_list else monitor,
        max_steps=9,
        logger=logger,
        log_every_n_steps=50,
    )
    assert [r.step for r in monitor.history] == [2, 4, 8]
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("ntk/relative_change")}
    assert sorted(logged) == [2, 4, 8]
    for report in monitor.history:
        row = logged[report.step]
        assert float(row["ntk/relative_change"]) == pytest.approx(report.relative_change)
        assert float(row["ntk/lazy"]) in (0.0, 0.5, 1.0)
        assert "ntk/layer/net.0/relative_change" in row
    last = monitor.history[-1]
    metrics = trainer.callback_metrics
    assert float(metrics["ntk/relative_change"]) == pytest.approx(last.relative_change)
    assert "ntk/relative_change" in trainer.progress_bar_metrics
    assert "ntk/lazy" in trainer.progress_bar_metrics


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_tensorboard_scalars_histogram_image_text(namespace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl = importlib.import_module(namespace)
    monitor = monitor_cls(namespace)(n_probe=9, log_base=2)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    fit(namespace, monitor, max_steps=8, logger=logger, log_every_n_steps=50)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"ntk/relative_change", "ntk/lazy", "ntk/logit_norm", "ntk/eig_max"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in acc.Scalars("ntk/relative_change")] == [2, 4, 8]
    assert "ntk/spectrum" in tags["histograms"]
    assert "ntk/kernel" in tags["images"]
    image = acc.Images("ntk/kernel")[-1]
    assert image.width >= 256 and image.height >= 256  # upsampled blocks, not 9 × 9 pixels
    assert "ntk/diagnosis/text_summary" in tags["tensors"]
    text = acc.Tensors("ntk/diagnosis/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert monitor.history[-1].verdict in text
    assert monitor.diagnosis in text  # the run so far
    # thresholds travel as one JSON text, not as constant series
    assert not [tag for tag in tags["scalars"] if "threshold" in tag]
    thresholds = acc.Tensors("ntk/thresholds/text_summary")[0].tensor_proto.string_val[0]
    assert b'"relative_change": [0.1, 0.5]' in thresholds
    layout = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert b"ntk/relative_change" in layout and b"ntk/regime" in layout


def test_early_stopping_on_an_ntk_metric():
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    stopper = pl.callbacks.EarlyStopping(
        monitor="ntk/relative_change",
        mode="min",
        divergence_threshold=1e-6,
        check_on_train_epoch_end=True,
    )
    monitor = NTKMonitor(n_probe=9, log_base=2, every_n_steps=1)
    trainer, _ = fit("pytorch_lightning", [monitor, stopper], max_steps=40, max_epochs=10)
    assert trainer.global_step == 3  # first epoch (3 batches) ends, the check stops it
    assert stopper.stopped_epoch == 0


def test_scalars_go_through_module_log_when_the_trainer_has_no_metric_dicts():
    from types import MappingProxyType

    from lightning_ntk.monitor._publish import publish as _publish

    logged = []
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append((name, value, kw)))
    trainer = SimpleNamespace(
        callback_metrics=MappingProxyType({}), progress_bar_metrics=MappingProxyType({})
    )
    scalars = {"ntk/relative_change": 0.25, "ntk/step": 3.0}
    _publish(trainer, module, scalars, epoch_end=True, prog_bar=True)
    assert [(name, value) for name, value, _ in logged] == list(scalars.items())
    flags = [(kw["prog_bar"], kw["logger"], kw["on_epoch"], kw["on_step"]) for *_, kw in logged]
    assert flags == [(True, False, True, False), (False, False, True, False)]

    trainer = SimpleNamespace(callback_metrics={}, progress_bar_metrics={})
    logged.clear()
    _publish(trainer, module, scalars, epoch_end=False, prog_bar=False)
    assert logged == [] and trainer.progress_bar_metrics == {}
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == scalars
    assert all(isinstance(v, torch.Tensor) for v in trainer.callback_metrics.values())


def test_model_checkpoint_monitors_an_ntk_metric(tmp_path):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, monitor="ntk/kernel_distance", mode="min", every_n_epochs=1
    )
    monitor = NTKMonitor(n_probe=9, every_n_steps=3, log_base=None)
    fit("pytorch_lightning", [monitor, checkpoint], max_steps=6, enable_checkpointing=True)
    assert checkpoint.best_model_path.endswith(".ckpt")
    assert float(checkpoint.best_model_score) == pytest.approx(
        min(r.kernel_distance for r in monitor.history)
    )


class _WithValidation(module_class("pytorch_lightning")):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def val_dataloader(self):
        return self.train_dataloader()


def test_epoch_schedule_and_no_report_in_the_sanity_check():
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(n_probe=9, every_n_epochs=1, log_base=None)
    calls = []
    original = monitor.tracker.update

    def spy(model, step):
        calls.append((step, model.trainer.sanity_checking))
        return original(model, step)

    monitor.tracker.update = spy
    trainer = pl.Trainer(
        callbacks=monitor, num_sanity_val_steps=2, **trainer_kwargs(max_epochs=2, max_steps=-1)
    )
    trainer.fit(_WithValidation())
    assert calls == [(3, False), (6, False)]
    assert float(trainer.callback_metrics["ntk/step"]) == 6.0


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_on_breakdown_warn_once_per_transition(namespace):
    monitor = monitor_cls(namespace)(
        n_probe=9, log_base=2, thresholds=BREAK_AT_ONCE, expect="lazy", every_n_steps=1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(namespace, monitor, max_steps=5)
    ours = [w for w in caught if issubclass(w.category, LinearizationBreakdownWarning)]
    assert len(monitor.history) == 5 and all(r.verdict == "broken" for r in monitor.history)
    assert len(ours) == 1
    assert "step 1:" in str(ours[0].message)
    assert "Laziness was expected" in str(ours[0].message)


def test_on_breakdown_stop_raise_and_callable():
    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(
        n_probe=9,
        log_base=2,
        thresholds=BREAK_AT_ONCE,
        expect="lazy",
        every_n_steps=1,
        on_breakdown="stop",
    )
    trainer, _ = fit("pytorch_lightning", monitor, max_steps=20)
    assert trainer.global_step == 1 and monitor.history[-1].verdict == "broken"

    monitor = NTKMonitor(
        n_probe=9,
        log_base=2,
        thresholds=BREAK_AT_ONCE,
        expect="lazy",
        every_n_steps=1,
        on_breakdown="raise",
    )
    with pytest.raises(LinearizationBreakdownError, match=r"step 1: .*Laziness was expected"):
        fit("pytorch_lightning", monitor, max_steps=20)

    seen = []
    monitor = NTKMonitor(
        n_probe=9,
        thresholds=BREAK_AT_ONCE,
        expect="lazy",
        every_n_steps=1,
        on_breakdown=seen.append,
    )
    fit("pytorch_lightning", monitor, max_steps=4)
    assert len(seen) == 1 and isinstance(seen[0], NTKReport) and seen[0].step == 1


def test_predicted_regime_is_read_from_optimizer_and_loss():
    from lightning_ntk import NTKMonitor

    hard = NTKMonitor(n_probe=9, log_base=2)
    fit("pytorch_lightning", hard, max_steps=2)
    smooth = NTKMonitor(n_probe=9, log_base=2)
    fit("pytorch_lightning", smooth, {"label_smoothing": 0.1}, max_steps=2)
    decay = NTKMonitor(n_probe=9, log_base=2)
    fit("pytorch_lightning", decay, {"weight_decay": 0.01}, max_steps=2)
    assert hard.history[-1].predicted_regime == "diverging"
    assert smooth.history[-1].predicted_regime == "bounded"
    assert decay.history[-1].predicted_regime == "bounded"


def test_dict_batches_and_batch_to_xy():
    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(n_probe=9, log_base=2)
    fit("pytorch_lightning", monitor, {"dict_batches": True}, max_steps=2)
    assert torch.bincount(monitor.tracker.probe_y).tolist() == [3, 3, 3]
    custom = NTKMonitor(
        n_probe=9, log_base=2, batch_to_xy=lambda b: (b["features"] * 2, b["label"])
    )
    fit("pytorch_lightning", custom, {"dict_batches": True}, max_steps=2)
    torch.testing.assert_close(custom.tracker.probe_x, 2 * monitor.tracker.probe_x)


def test_hugging_face_style_batches_pass_every_field_by_keyword():
    """``{"pixel_values": ..., "labels": ...}`` batches and a model called by keyword."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_ntk import NTKMonitor
    from lightning_ntk.monitor._probe import default_batch_to_xy

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    inputs, labels = default_batch_to_xy({"pixel_values": x, "labels": y})
    assert set(inputs) == {"pixel_values"} and labels is y
    inputs, labels = default_batch_to_xy({"input_ids": x, "attention_mask": x, "label": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is y
    with pytest.raises(TypeError, match="nothing but the labels"):
        default_batch_to_xy({"labels": y})

    class Processed(module_class("pytorch_lightning")):
        def __init__(self):
            super().__init__(bn_dropout=True)  # BatchNorm: the whole-batch kernel

        def forward(self, pixel_values):
            return self.net(pixel_values)

        def training_step(self, batch, batch_idx):
            return self.loss_fn(self(pixel_values=batch["pixel_values"]), batch["labels"])

        def train_dataloader(self):
            features, targets = blobs(self.n, self.d, self.classes)
            rows = [{"pixel_values": f, "labels": t} for f, t in zip(features, targets)]
            return DataLoader(rows, batch_size=self.batch_size)

    monitor = NTKMonitor(n_probe=9, log_base=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=4)).fit(Processed())
    assert [r.step for r in monitor.history] == [2, 4]
    assert set(monitor.tracker.probe_x) == {"pixel_values"}


class _NoForward(module_class("pytorch_lightning")):
    def forward(self, x):
        return {"logits": self.net(x)}


def test_forward_fn_for_models_without_logits():
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    class Model(_NoForward):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self(x)["logits"], y)

    trainer = pl.Trainer(callbacks=NTKMonitor(n_probe=9, log_base=2), **trainer_kwargs(max_steps=2))
    with pytest.raises(TypeError, match="forward_fn"):
        trainer.fit(Model())
    monitor = NTKMonitor(n_probe=9, log_base=2, forward_fn=lambda module, x: module(x)["logits"])
    pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=4)).fit(Model())
    assert [r.step for r in monitor.history] == [2, 4]


def test_compiled_submodule():
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    torch._dynamo.reset()
    pl.seed_everything(0, verbose=False)
    model = module_class("pytorch_lightning")()
    model.net = torch.compile(model.net, backend="eager")
    monitor = NTKMonitor(n_probe=9, log_base=2)
    pl.Trainer(callbacks=monitor, **trainer_kwargs(max_steps=4)).fit(model)
    plain = NTKMonitor(n_probe=9, log_base=2)
    fit("pytorch_lightning", plain, max_steps=4)
    assert [r.step for r in monitor.history] == [2, 4]
    assert "ntk/layer/net.0/relative_change" in monitor.tracker.scalars()
    for a, b in zip(monitor.history, plain.history):
        assert a.relative_change == pytest.approx(b.relative_change, rel=1e-5)
    # the whole LightningModule compiled
    pl.seed_everything(0, verbose=False)
    compiled = torch.compile(module_class("pytorch_lightning")(), backend="eager")
    whole = NTKMonitor(n_probe=9, log_base=2)
    pl.Trainer(callbacks=whole, **trainer_kwargs(max_steps=4)).fit(compiled)
    assert len(whole.history) == len(plain.history)
    for a, b in zip(whole.history, plain.history):
        assert a.relative_change == pytest.approx(b.relative_change, rel=1e-5)


def test_bad_arguments_raise_clear_errors():
    from lightning_ntk import NTKMonitor

    with pytest.raises(ValueError, match="Expected `on_breakdown` to be one of"):
        NTKMonitor(on_breakdown="explode")
    with pytest.raises(ValueError, match="Expected `output` to be one of"):
        NTKMonitor(output="bogus")
    with pytest.raises(ValueError, match="Expected `method` to be one of"):
        NTKMonitor(method="bogus")
    with pytest.raises(ValueError, match="`n_probe` to be a positive int but got 0"):
        NTKMonitor(n_probe=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        NTKMonitor(probe_x=torch.empty(0, 6))
    with pytest.raises(ValueError, match="`weight_decay` to be a non-negative number"):
        NTKMonitor(weight_decay=-1.0)
    with pytest.raises(ValueError, match="`n_probe` to be at most the dataset size 48 but got 100"):
        fit("pytorch_lightning", NTKMonitor(n_probe=100), max_steps=1)


def test_given_probe_is_used():
    from lightning_ntk import NTKMonitor

    x, y = blobs(5, seed=7)
    monitor = NTKMonitor(probe_x=x, probe_y=y)
    fit("pytorch_lightning", monitor, max_steps=2)
    assert torch.equal(monitor.tracker.probe_x, x)
    assert monitor.tracker.last_kernel.shape == (5, 5, 3, 3)


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused_at_setup(strategy_name):
    from lightning_ntk import NTKMonitor

    strategy = type(strategy_name, (), {})()
    trainer = SimpleNamespace(strategy=strategy)
    why = "DeepSpeed partitions parameters" if "DeepSpeed" in strategy_name else "FSDP1"
    with pytest.raises(
        ValueError, match=f"does not support {strategy_name}: .*{why}.*ModelParallelStrategy"
    ):
        NTKMonitor().setup(trainer, nn.Linear(2, 2), "fit")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_real_fsdp_strategy_is_refused_at_setup(namespace):
    pl = importlib.import_module(namespace)
    trainer = SimpleNamespace(strategy=pl.strategies.FSDPStrategy())
    with pytest.raises(ValueError, match=r"FSDPStrategy: .*only on GPUs.*strategy='ddp'"):
        monitor_cls(namespace)().setup(trainer, nn.Linear(2, 2), "fit")


def test_two_monitors_keep_separate_checkpoint_state(tmp_path):
    import pytorch_lightning as pl

    from lightning_ntk import NTKMonitor

    full, trace = (
        NTKMonitor(n_probe=9, log_base=2),
        NTKMonitor(n_probe=9, log_base=2, output="trace"),
    )
    trainer, _ = fit("pytorch_lightning", [full, trace], max_steps=2)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert {full.state_key, trace.state_key} <= set(states) and full.state_key != trace.state_key
    restored = NTKMonitor(n_probe=9, log_base=2, output="trace")
    restored.load_state_dict(states[trace.state_key])
    assert restored.history == trace.history
    assert restored.tracker.last_kernel.shape == (9, 9)
    assert pl.Callback in type(restored).__mro__


def _report(step: int, verdict: str) -> NTKReport:
    nan = float("nan")
    return NTKReport(step, *([nan] * 13), verdict, [], "unknown", f"{verdict} at {step}")


def test_warning_once_per_transition_into_broken():
    from lightning_ntk import NTKMonitor

    monitor = NTKMonitor(log_base=2)
    trainer = SimpleNamespace(should_stop=False)
    verdicts = ["lazy", "broken", "broken", "drifting", "broken", "broken"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, verdict in enumerate(verdicts, start=1):
            monitor._act(trainer, _report(step, verdict))
    messages = [str(w.message) for w in caught if w.category is LinearizationBreakdownWarning]
    assert messages == [
        "NTKMonitor (ntk/) step 2: broken at 2",
        "NTKMonitor (ntk/) step 5: broken at 5",
    ]
    assert trainer.should_stop is False
    stopper = NTKMonitor(on_breakdown="stop")
    stopper._act(trainer, _report(1, "drifting"))
    assert trainer.should_stop is False
    stopper._act(trainer, _report(2, "broken"))
    assert trainer.should_stop is True
