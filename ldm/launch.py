"""Wire a merged config into Lightning: loggers, callbacks, trainer, learning rate, then fit and test."""
from __future__ import annotations

import difflib
import inspect
import os
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import DEFAULT_TARGETS
from ldm.config import to_container
from ldm.util import ConfigError, instantiate_from_config


def _wandb_without_prompt() -> None:
    """W&B must never wait on a login prompt: without credentials it logs offline (sync later with `wandb sync`)."""
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    if not logged_in and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        print("W&B: no credentials found, logging offline (upload later with `wandb sync`)")


def build_loggers(cfg: dict, logdir: Path) -> list:
    """``lightning.logger``: one ``{target, params}`` block or named blocks. CSV is always on (the loss curve reads
    it; a resumed run appends to it)."""
    blocks = {"csv": {"target": "ldm.callbacks.csv_logger.HistoryCSVLogger", "params": {"name": "", "version": ""}}}
    if cfg:
        blocks.update({"logger": cfg} if "target" in cfg else cfg)
    loggers = []
    for name, block in blocks.items():
        if not block:
            continue
        params = dict(block.get("params") or {})
        if "WandbLogger" in block["target"]:
            _wandb_without_prompt()
            params.setdefault("save_dir", str(logdir))
            params.setdefault("name", logdir.name)
        else:
            params.setdefault("save_dir", str(logdir))
        loggers.append(instantiate_from_config({"target": block["target"], "params": params}))
    return loggers


def default_callbacks(logdir: Path, now: str, config: dict, lightning_config: dict, resume: bool) -> dict:
    ckptdir = str(logdir / "checkpoints")
    checkpoint = {"dirpath": ckptdir, "filename": "{epoch:06}", "save_last": True, "save_top_k": -1,
                  "every_n_epochs": 1, "verbose": True,
                  # Run dirs are unique, so an existing last.ckpt is this run's own (resumed): overwrite, never last-v1.
                  "enable_version_counter": False}
    checkpoint.update((lightning_config.get("modelcheckpoint") or {}).get("params") or {})
    if checkpoint.get("save_top_k", -1) not in (-1, 0) and not checkpoint.get("monitor"):
        # CompVis's model.params.monitor names the metric "best" means when the checkpoint config keeps the top k.
        checkpoint["monitor"] = to_container((config.get("model") or {}).get("params") or {}).get("monitor", "val/loss")
    params = {
        "setup_callback": {"logdir": str(logdir), "now": now, "config": config, "lightning_config": lightning_config,
                           "resume": resume},
        "image_logger": {"logdir": str(logdir)},
        "learning_rate_logger": {"logging_interval": "step"},
        "checkpoint": checkpoint,
        "nan_guard": {},
        "save_on_interrupt": {"ckpt_dir": ckptdir},
        "random_state": {},
        "rank_watch": {},
        "loss_curve": {"logdir": str(logdir)},
        "progress": {"logdir": str(logdir)},
        "report": {"logdir": str(logdir), "disabled": False},
    }
    return {name: {"target": target, "params": params[name]} for name, target in DEFAULT_TARGETS.items()}


def build_callbacks(lightning_config: dict, defaults: dict) -> list:
    """Config ``lightning.callbacks.<name>`` blocks update the defaults of the same name or add new ones."""
    given = lightning_config.get("callbacks") or {}
    if "checkpoint" in given:
        raise ConfigError("lightning.callbacks.checkpoint: the checkpoint callback is configured in one place, "
                          "lightning.modelcheckpoint.params (CompVis's key)")
    merged = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.create(given))
    return [instantiate_from_config(block) for block in to_container(merged).values() if block]


def trainer_kwargs(trainer_cfg: dict, gpus: str | None, num_nodes: int) -> dict:
    import pytorch_lightning as pl

    # A '+lightning.trainer.x=1' override gets past the config layer; Trainer would then fail with a traceback.
    accepted = inspect.signature(pl.Trainer.__init__).parameters
    for key in trainer_cfg:
        if key not in accepted:
            close = difflib.get_close_matches(key, [k for k in accepted if k != "self"], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"lightning.trainer.{key} is not an argument of pytorch_lightning.Trainer{hint}")
    kwargs = {"accelerator": "auto", "devices": 1, "num_nodes": num_nodes}
    kwargs.update(trainer_cfg)
    if gpus is not None:
        try:
            ids = [int(g) for g in str(gpus).replace(" ", "").strip(",").split(",") if g != ""]
        except ValueError:
            raise ConfigError(f"--gpus {gpus}: expected GPU ids such as 0 or 0,1") from None
        if not torch.cuda.is_available():
            raise ConfigError(f"--gpus {gpus}: no CUDA GPU is visible here; to train on the CPU drop --gpus "
                              "(or set lightning.trainer.accelerator=cpu lightning.trainer.devices=N for N processes)")
        if any(i >= torch.cuda.device_count() for i in ids):
            raise ConfigError(f"--gpus {gpus}: only {torch.cuda.device_count()} GPU(s) visible (ids 0..{torch.cuda.device_count() - 1})")
        kwargs.update(accelerator="gpu", devices=ids)
        if len(ids) > 1 or num_nodes > 1:
            kwargs.setdefault("strategy", "ddp")
    return kwargs


def learning_rate(model, data, trainer, base_lr: float, scale: bool) -> float:
    accumulate = trainer.accumulate_grad_batches
    devices, nodes, batch = trainer.num_devices, trainer.num_nodes, data.batch_size
    if not scale:
        print(f"learning rate {base_lr:.2e} (not scaled; --scale_lr true multiplies it by accumulate x devices x nodes x batch)")
        return base_lr
    lr = accumulate * devices * nodes * batch * base_lr
    print(f"learning rate {lr:.2e} = {accumulate} (accumulate) x {devices} (devices) x {nodes} (nodes) x {batch} (batch) x {base_lr:.2e} (base)")
    return lr


def train(config: DictConfig, args, logdir: Path, now: str, resume_ckpt: Path | None) -> int:
    import pytorch_lightning as pl

    from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

    from ldm.callbacks.checkpoint_io import AtomicCheckpointIO, remove_partial_writes
    from ldm.callbacks.rank_watch import LAUNCHED_BY, is_lost_peer, lost_rank_line, say_once, watched_report
    from ldm.weights import load_weights

    lightning_config = to_container(config.pop("lightning", None)) or {}  # from here on, plain dicts
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"the merged config has no '{section}' section (sections found: {sorted(config)})")
    project = to_container(config)
    # Checked before the (possibly multi-GB) model is built, so --gpus/trainer mistakes fail fast.
    kwargs = trainer_kwargs(lightning_config.get("trainer") or {}, args.gpus, args.num_nodes)
    pl.seed_everything(args.seed, workers=True, verbose=False)  # Lightning's own line would go to stderr
    print(f"seed {args.seed}")

    data = instantiate_from_config(project["data"])
    if not args.train and not {"validation", "test"} & set(getattr(data, "datasets", {})):
        raise ConfigError("nothing to do: without -t main.py only validates and tests, and the data has no "
                          "validation or test split; add -t to train")
    model = instantiate_from_config(project["model"])
    if args.finetune_from:
        print(load_weights(model, args.finetune_from, ema=args.finetune_ema))
    print(model.summary())

    loggers = build_loggers(lightning_config.get("logger") or {}, logdir)
    callbacks = build_callbacks(lightning_config,
                                default_callbacks(logdir, now, project, lightning_config, resume_ckpt is not None))
    try:
        trainer = pl.Trainer(default_root_dir=str(logdir), logger=loggers, callbacks=callbacks,
                             plugins=[AtomicCheckpointIO()], **kwargs)
    except (MisconfigurationException, ValueError) as err:  # e.g. accelerator=gpu without a GPU, devices=0
        keys = ("accelerator", "devices", "strategy", "num_nodes")
        placement = ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)
        raise ConfigError(f"lightning.trainer ({placement}): {' '.join(str(err).split())}") from err
    model.learning_rate = learning_rate(model, data, trainer, float(project["model"].get("base_learning_rate", 1e-4)),
                                        args.scale_lr)
    if trainer.is_global_zero:
        print(f"run dir: {logdir}")
        if resume_ckpt is not None:
            for name, size in remove_partial_writes(logdir / "checkpoints"):
                print(f"removed {name} ({size / 2**20:.1f} MiB), a checkpoint write a killed process left unfinished")
    if "LOCAL_RANK" not in os.environ:  # this process starts the other ranks, if any (ldm.callbacks.rank_watch)
        os.environ[LAUNCHED_BY] = str(os.getpid())
    if args.train:
        try:
            trainer.fit(model, data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        except SIGTERMException:
            # Lightning raises SystemExit(None) here (exit status 0) after SaveOnInterrupt wrote last.ckpt;
            # job schedulers and shells must see that the run was stopped, as a shell reports a SIGTERM.
            return 128 + signal.SIGTERM
        except RuntimeError as err:
            if resume_ckpt is not None and "Error(s) in loading state_dict" in str(err):
                lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
                raise ConfigError(f"--resume: {resume_ckpt} does not fit this model (it was trained with another "
                                  f"architecture): {' '.join(lines[1:3])[:300]}") from None
            if trainer.world_size > 1 and is_lost_peer(err):  # a DDP process died: one line, not a traceback
                if watched_report(trainer) is None:  # rank 0's RankWatch names the rank when it can
                    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                    say_once(trainer, lost_rank_line(trainer, f"rank {trainer.global_rank} lost the other processes "
                                                              f"({reason})"))
                return 1
            raise
    if not args.no_test and "test" in getattr(data, "datasets", {}) and not trainer.interrupted:
        trainer.test(model, data)
    if not args.train and "validation" in getattr(data, "datasets", {}):
        trainer.validate(model, data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    return 0
