"""Lightning callbacks of a training run.

``DEFAULT_TARGETS`` names the classes main.py adds to every run, by their ``lightning.callbacks.<name>`` key, so a
config (or a command-line override such as ``lightning.callbacks.image_logger.params.steps=20``) can change their
params without repeating the target. ``lightning.modelcheckpoint.params`` configures the ``checkpoint`` entry.
"""

DEFAULT_TARGETS = {
    "setup_callback": "ldm.callbacks.setup.SetupCallback",
    "image_logger": "ldm.callbacks.image_logger.ImageLogger",
    "learning_rate_logger": "pytorch_lightning.callbacks.LearningRateMonitor",
    "checkpoint": "ldm.callbacks.checkpoints.RunCheckpoint",
    "nan_guard": "ldm.callbacks.faults.NaNGuard",
    "save_on_interrupt": "ldm.callbacks.faults.SaveOnInterrupt",
    "random_state": "ldm.callbacks.random_state.RandomState",
    "rank_watch": "ldm.callbacks.rank_watch.RankWatch",  # DDP: a rank that dies is named, the others stop  # a resumed run draws the numbers it would have
    "loss_curve": "ldm.callbacks.loss_curve.LossCurve",
    "progress": "ldm.callbacks.progress.ProgressFrames",  # off until params.every_n_steps is set
    "report": "ldm.callbacks.report.RunReport",
}
IMPLICIT_TARGETS = {f"lightning.callbacks.{name}": target for name, target in DEFAULT_TARGETS.items()}
IMPLICIT_TARGETS["lightning.modelcheckpoint"] = DEFAULT_TARGETS["checkpoint"]
