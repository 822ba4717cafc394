"""Fault tolerance: atomic checkpoint files, NaN stop, save on Ctrl-C/SIGTERM and mid-epoch resume, loss plot."""
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.checkpoint_io import AtomicCheckpointIO
from ldm.callbacks.faults import NaNGuard, NonFiniteLossError, SaveOnInterrupt, check_finite, last_good_checkpoint
from ldm.callbacks.loss_curve import LossCurve


class TinyModule(pl.LightningModule):
    """Linear regression on 64 random samples: 16 batches per epoch, so steps 3-5 are mid-epoch."""

    def __init__(self, nan_at=None, check_in_step=False):
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 1)
        gen = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        if self.hparams.nan_at is not None and self.global_step >= self.hparams.nan_at:
            loss = loss * float("nan")
        if self.hparams.check_in_step:
            check_finite(loss, self.global_step, last_good_checkpoint(self.trainer))
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16)


class AtStep(pl.Callback):
    """Runs ``action(trainer)`` once, at the end of the batch after which global_step == ``step``."""

    def __init__(self, step, action):
        self.step, self.action, self.fired = step, action, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.fired:
            self.fired = True
            self.action(trainer)


class FirstStep(pl.Callback):
    """Records the global step of the first batch a (resumed) run trains on."""

    first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step


def make_trainer(max_steps, callbacks, **kwargs):
    defaults = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 0, "num_sanity_val_steps": 0}
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        **{**defaults, **kwargs},
    )


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Lightning ignores SIGINT after a KeyboardInterrupt; don't let that leak into the rest of the session."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def assert_resumes_from(ckpt, step):
    """A fresh Trainer with ckpt_path continues at ``step`` (mid-epoch) and reaches a later max_steps."""
    first = FirstStep()
    trainer = make_trainer(step + 3, [first])
    trainer.fit(TinyModule(), ckpt_path=ckpt)
    assert first.first == step
    assert trainer.global_step == step + 3


def test_sigterm_mid_epoch_saves_last_and_resumes(tmp_path, restore_signal_handlers):
    ckpt_dir = tmp_path / "checkpoints"
    kill = AtStep(5, lambda trainer: os.kill(os.getpid(), signal.SIGTERM))
    trainer = make_trainer(50, [kill, SaveOnInterrupt(str(ckpt_dir))])
    # Lightning turns SIGTERM into SIGTERMException (a SystemExit) at the end of the batch.
    with pytest.raises(SystemExit):
        trainer.fit(TinyModule())
    assert kill.fired and trainer.received_sigterm
    # Lightning restored the handler it replaced.
    assert signal.getsignal(signal.SIGTERM) == restore_signal_handlers[signal.SIGTERM]
    ckpt = ckpt_dir / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)  # plain Lightning checkpoint passes the safe unpickler
    assert state["global_step"] == 5
    assert_resumes_from(str(ckpt), 5)


def test_keyboard_interrupt_saves_last(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"

    def ctrl_c(trainer):
        raise KeyboardInterrupt

    trainer = make_trainer(50, [AtStep(3, ctrl_c), SaveOnInterrupt(str(ckpt_dir))])
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends with sys.exit(1)
        trainer.fit(TinyModule())
    ckpt = ckpt_dir / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    assert_resumes_from(str(ckpt), 3)


@pytest.mark.parametrize("check_in_step", [True, False], ids=["check_finite", "NaNGuard"])
def test_nan_stops_run_and_keeps_good_checkpoint(tmp_path, check_in_step):
    ckpt_dir = tmp_path / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    snapshot = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                snapshot["bytes"] = last.read_bytes()

    every_step = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = make_trainer(
        50,
        [Snapshot(), NaNGuard(), SaveOnInterrupt(str(ckpt_dir)), every_step],
        enable_checkpointing=True,
    )
    message = r"loss became nan at global step 4; last good checkpoint is .*last\.ckpt"
    with pytest.raises(FloatingPointError, match=message):
        trainer.fit(TinyModule(nan_at=4, check_in_step=check_in_step))
    assert last.read_bytes() == snapshot["bytes"]
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert sorted(os.listdir(ckpt_dir)) == ["last.ckpt"]


def test_nan_weights_are_never_saved(tmp_path):
    def poison(trainer):
        with torch.no_grad():
            trainer.lightning_module.layer.weight.fill_(float("inf"))

    trainer = make_trainer(
        50,
        [AtStep(2, poison), NaNGuard(), ModelCheckpoint(dirpath=str(tmp_path), save_last=True, every_n_train_steps=1)],
        enable_checkpointing=True,
    )
    with pytest.raises(NonFiniteLossError, match="weight layer.weight is not finite at global step 2"):
        trainer.fit(TinyModule())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch, error):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # a half-written file is on disk when the failure hits
        raise error

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(type(error)):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 1
    io.save_checkpoint({"global_step": 3}, path)
    assert io.load_checkpoint(path) == {"global_step": 3}


def test_unsafe_checkpoint_needs_explicit_trust(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"cfg": TinyModule}, path)  # a class object: refused by the weights_only unpickler
    with pytest.raises(Exception, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert AtomicCheckpointIO(weights_only=False).load_checkpoint(path)["cfg"] is TinyModule


def test_loss_curve_png(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path), name="run")
    trainer = make_trainer(
        24, [LossCurve(str(tmp_path))], logger=logger, log_every_n_steps=1, limit_val_batches=2, val_check_interval=8
    )
    trainer.fit(TinyModule())
    png = tmp_path / "loss_curve.png"
    assert png.stat().st_size > 0
    with Image.open(png) as img:
        img.verify()
