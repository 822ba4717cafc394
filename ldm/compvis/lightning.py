"""CompVis's ``lightning`` section → this project's: ``main.ImageLogger``, ``modelcheckpoint``, callbacks, the
logger, ``find_unused_parameters`` and the Lightning 1.x trainer keys that Lightning 2 renamed.

CompVis's image logger draws with ``log_images_kwargs`` whose defaults are its ``log_images``' own: 200 DDIM steps
with eta 1, no guidance (scale 1), 8 images; those defaults are kept when a key is absent.
"""
from __future__ import annotations

from ldm.callbacks.image_logger import ImageLogger
from ldm.compvis.keys import Params, Record, refuse

COMPVIS_IMAGE_LOGGER = "main.ImageLogger"
IMAGE_LOGGER = "ldm.callbacks.image_logger.ImageLogger"
STEP_LOGGER = "ldm.compvis.lightning.StepDoublingImageLogger"
LR_MONITORS = ("main.LearningRateMonitor", "pytorch_lightning.callbacks.LearningRateMonitor")
MODEL_CHECKPOINTS = ("pytorch_lightning.callbacks.ModelCheckpoint",
                     "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
TESTTUBE = "pytorch_lightning.loggers.TestTubeLogger"
ALL_BATCHES = 2 ** 31 - 1  # log_all_val: every validation batch
# Lightning 1.x trainer keys → Lightning 2's.
RENAMED = {"weights_summary": "enable_model_summary", "replace_sampler_ddp": "use_distributed_sampler",
           "checkpoint_callback": "enable_checkpointing"}


class StepDoublingImageLogger(ImageLogger):
    """The image logger that also draws after steps 1, 2, 4, ... below ``batch_frequency``: CompVis's
    ``increase_log_steps`` (its default), for a first look at a run before the first regular grid."""

    def _due(self, step: int) -> bool:
        early = 0 < step < self.batch_frequency and step & (step - 1) == 0 and step != self._last_step
        return early or super()._due(step)


def _negative(label, kind: str, where: str) -> str:
    """``unconditional_guidance_label``: the condition guidance steers away from, i.e. the negative prompt."""
    if label is None:
        return ""
    labels = [label] if isinstance(label, str) else list(label)
    if len(set(labels)) != 1 or not isinstance(labels[0], str):
        refuse(where, f"{label!r}: one label (a string, or a list of one) is supported")
    if kind == "image" and labels[0] != "":
        refuse(where, f"{label!r}: an image model's unconditional condition is the empty one ('')")
    return labels[0]


def image_logger(block: dict, record: Record, kind: str, timesteps: int, where: str) -> tuple[dict, dict]:
    """``main.ImageLogger`` → (our image logger block, model params it implies)."""
    extra = sorted(set(block) - {"target", "params"})
    if extra:
        refuse(f"{where}.{extra[0]}", "a callback block holds target and params")
    # CompVis merges a config's block over its default {batch_frequency: 750, max_images: 4, clamp: true}.
    p = Params({"batch_frequency": 750, "max_images": 4, **(block.get("params") or {})}, f"{where}.params", record)
    kw = Params(p.take("log_images_kwargs"), f"{where}.params.log_images_kwargs", record)
    steps = kw.take("ddim_steps", 200)
    params = {"batch_frequency": int(p.take("batch_frequency")),
              "max_images": min(int(p.take("max_images")), int(kw.take("N", 8))),
              "log_first_step": bool(p.take("log_first_step", False)), "disabled": bool(p.take("disabled", False)),
              # ddim_steps: null is CompVis's ancestral sampling over every timestep.
              "sampler": "ddim" if steps is not None else "ddpm",
              "steps": int(steps if steps is not None else timesteps), "eta": float(kw.take("ddim_eta", 1.0)),
              "guidance_scale": float(kw.take("unconditional_guidance_scale", 1.0)),
              "negative_prompt": _negative(kw.take("unconditional_guidance_label"), kind,
                                           kw.key("unconditional_guidance_label"))}
    if "n_row" in kw:
        params["nrow"] = int(kw.take("n_row"))
    if p.take("log_all_val", False):
        params["max_val_batches"] = ALL_BATCHES
    p.ignore("clamp", "samples are always clamped to [-1, 1]", allowed=True)
    p.ignore("rescale", "grids are always mapped from [-1, 1] to 0..255", allowed=True)
    p.ignore("log_on_batch_idx", "grids are due by global step", allowed=False)
    model_params = {}
    if not kw.take("use_ema_scope", True):
        model_params["sample_with_ema"] = False
        record.note(f"{where}: use_ema_scope false → model.params.sample_with_ema: false (grids and val/loss use "
                    "the raw weights)")
    for name in ("inpaint", "plot_progressive_rows", "plot_diffusion_rows", "plot_denoise_rows"):
        kw.ignore(name, "only inputs, reconstructions and samples are drawn here; set it to false", allowed=False)
    kw.ignore("sample", "samples are always drawn", allowed=True)
    kw.ignore("quantize_denoised")  # only for VQ first stages
    kw.ignore("return_keys", "every grid is kept", allowed=None)
    kw.finish("CompVis's log_images")
    increase = p.take("increase_log_steps", True)
    p.finish("CompVis's ImageLogger")
    target = STEP_LOGGER if increase else IMAGE_LOGGER
    record.block(where, block.get("target", COMPVIS_IMAGE_LOGGER), target)
    return {"target": target, "params": params}, model_params


def _checkpoint(block: dict, record: Record) -> dict:
    block = dict(block or {})
    target = block.pop("target", None)
    if target is not None:
        if target not in MODEL_CHECKPOINTS:
            refuse("lightning.modelcheckpoint.target", f"{target!r}: the checkpoint callback is "
                   "ldm.callbacks.checkpoints.RunCheckpoint (Lightning's ModelCheckpoint with best.ckpt and scores)")
        record.block("lightning.modelcheckpoint", target, "ldm.callbacks.checkpoints.RunCheckpoint")
    params = dict(block.pop("params", None) or {})
    if block:
        refuse(f"lightning.modelcheckpoint.{sorted(block)[0]}", "modelcheckpoint holds target and params")
    if (params.get("every_n_train_steps") or params.get("train_time_interval")) and "every_n_epochs" not in params:
        params["every_n_epochs"] = 0  # Lightning takes one trigger; ours defaults to every epoch
    return {"params": params}


def _trainer(trainer: dict, record: Record) -> dict:
    trainer = dict(trainer)
    if "resume_from_checkpoint" in trainer:
        refuse("lightning.trainer.resume_from_checkpoint", "continue a run with -r logs/<run dir>")
    for old, new in RENAMED.items():
        if old in trainer:
            value = trainer.pop(old)
            trainer[new] = bool(value) if old != "weights_summary" else value is not None
            record.note(f"lightning.trainer.{old} → {new}: {trainer[new]}")
    # Lightning 1.x named the DDP flavour in accelerator (or distributed_backend); Lightning 2 in strategy.
    for name in ("distributed_backend", "accelerator"):
        if trainer.get(name) in ("ddp", "ddp_spawn", "dp", "ddp2"):
            strategy = trainer.pop(name)
            if strategy not in ("ddp", "ddp_spawn"):
                refuse(f"lightning.trainer.{name}", f"{strategy!r}: Lightning 2 has DDP (ddp, ddp_spawn) only")
            trainer.setdefault("strategy", strategy)
            record.note(f"lightning.trainer.{name} {strategy} → strategy: {trainer['strategy']}")
    if "gpus" in trainer:
        gpus = trainer.pop("gpus")
        ids = [int(g) for g in str(gpus).replace(" ", "").strip(",").split(",") if g != ""]
        count = isinstance(gpus, int) and not isinstance(gpus, bool)
        if gpus is None or (count and gpus == 0):  # Lightning 1's "no GPU"
            record.note(f"lightning.trainer.gpus {gpus} → no GPU (Lightning picks the accelerator)")
        else:
            trainer.update(accelerator="gpu", devices=gpus if count else ids)
            if (gpus if count else len(ids)) > 1:
                trainer.setdefault("strategy", "ddp")
            record.note(f"lightning.trainer.gpus {gpus} → accelerator: gpu, devices: {trainer['devices']}")
    if "progress_bar_refresh_rate" in trainer:
        rate = trainer.pop("progress_bar_refresh_rate")
        record.ignored.append("lightning.trainer.progress_bar_refresh_rate")
        if rate == 0:
            trainer["enable_progress_bar"] = False
    for name in ("terminate_on_nan", "amp_backend", "amp_level", "flush_logs_every_n_steps"):
        if name in trainer:  # a NaN loss always stops the run here; mixed precision is torch.autocast
            trainer.pop(name)
            record.ignored.append(f"lightning.trainer.{name}")
    return trainer


def _logger(block: dict, record: Record) -> dict:
    if block.get("target") != TESTTUBE:
        return block
    params = dict(block.get("params") or {})
    for name in ("debug", "create_git_tag", "description"):
        if name in params:
            params.pop(name)
            record.ignored.append(f"lightning.logger.params.{name}")
    target = "pytorch_lightning.loggers.TensorBoardLogger"  # test-tube wrote TensorBoard event files
    record.block("lightning.logger", TESTTUBE, target)
    return {"target": target, "params": params}


def _callbacks(callbacks: dict, record: Record, kind: str, timesteps: int, logdir: str | None) -> tuple[dict, dict]:
    out, model_params = {}, {}
    for name, block in (callbacks or {}).items():
        where = f"lightning.callbacks.{name}"
        block = dict(block or {})
        target = block.get("target")
        if target == COMPVIS_IMAGE_LOGGER or (name == "image_logger" and target is None):
            out[name], implied = image_logger(block, record, kind, timesteps, where)
            model_params.update(implied)
        elif target in LR_MONITORS or (name == "learning_rate_logger" and target is None):
            out["learning_rate_logger"] = {"params": block.get("params") or {}}
            if target:
                record.block(where, target, "pytorch_lightning.callbacks.LearningRateMonitor")
        elif target == "main.CUDACallback":
            record.ignored.append(where)  # prints epoch time and peak memory; the loss curve and report show time
        elif name == "metrics_over_trainsteps_checkpoint":
            # CompVis's extra weights-only checkpoints every N steps, kept in checkpoints/trainstep_checkpoints.
            params = {"filename": "{epoch:06}-{step:09}", "verbose": True, "save_top_k": -1,
                      "every_n_train_steps": 10000, "save_weights_only": True, **(block.get("params") or {})}
            if logdir is not None:
                params.setdefault("dirpath", f"{logdir}/checkpoints/trainstep_checkpoints")
            out[name] = {"target": MODEL_CHECKPOINTS[0], "params": params}
            record.block(where, "CompVis's metrics_over_trainsteps_checkpoint", MODEL_CHECKPOINTS[0])
        elif isinstance(target, str) and target.startswith("main."):
            refuse(f"{where}.target", f"{target!r} has no translation here (ImageLogger, LearningRateMonitor and "
                   "CUDACallback do; this project's own callbacks are listed in ldm.callbacks)")
        else:
            out[name] = block
    return out, model_params


def translate_lightning(section: dict, record: Record, kind: str, timesteps: int,
                        logdir: str | None = None) -> tuple[dict, dict]:
    """The lightning section in this project's terms, and model params it implies (``sample_with_ema``)."""
    section = dict(section or {})
    trainer = dict(section.pop("trainer", None) or {})
    unused = [("lightning", section.pop("find_unused_parameters", None)),
              ("lightning.trainer", trainer.pop("find_unused_parameters", None))]
    for where, value in unused:
        if value is None:
            continue
        if value:  # CompVis's DDPPlugin(find_unused_parameters=True)
            trainer.setdefault("strategy", "ddp_find_unused_parameters_true")
            record.note(f"{where}.find_unused_parameters true → lightning.trainer.strategy: {trainer['strategy']}")
        else:  # Lightning 2's DDP strategy already runs with find_unused_parameters=False
            record.ignored.append(f"{where}.find_unused_parameters")
    out = {"trainer": _trainer(trainer, record)}
    if "modelcheckpoint" in section:
        out["modelcheckpoint"] = _checkpoint(section.pop("modelcheckpoint"), record)
    callbacks, model_params = _callbacks(section.pop("callbacks", None), record, kind, timesteps, logdir)
    if callbacks:
        out["callbacks"] = callbacks
    if section.get("logger"):
        out["logger"] = _logger(dict(section.pop("logger")), record)
    section.pop("logger", None)
    if section:
        refuse(f"lightning.{sorted(section)[0]}", "the lightning section holds trainer, modelcheckpoint, callbacks, "
               "logger (and CompVis's find_unused_parameters)")
    return out, model_params
