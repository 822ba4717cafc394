"""CompVis's ``model`` section (``ldm.models.diffusion.ddpm.LatentDiffusion``) → our
``ldm.models.diffusion.LatentDiffusion``.

Defaults are CompVis's where they differ from ours: ``use_ema`` true, ``linear_start``/``linear_end`` 1e-4/2e-2,
``scale_factor`` 1, no condition dropout unless ``ucg_training`` asks for it. The fork's keys are translated too:
``ucg_training`` (dropout of the condition to the empty one) and ``unet_trainable`` (all / attn / conv_in).
"""
from __future__ import annotations

from ldm.compvis.keys import Params, Record, refuse
from ldm.compvis.networks import (BETA_SCHEDULES, LATENT_DIFFUSION, MONITORS, TARGETS, UNET, UNET_TRAINABLE,
                                  _check_target, conditioner, first_stage, unet_config)

OUR_SCHEDULER = "ldm.lr_scheduler.LambdaLinearScheduler"  # the same name and params in CompVis and here


def _ucg_rate(given, cond_key: str, where: str) -> float:
    """The fork's ``ucg_training: {<key>: {p: 0.1, val: ""}}``: each row's condition becomes the empty one with
    probability p (an empty caption; for the image embedder, the zero embedding), as ``ucg_rate`` does here."""
    rate = 0.0
    for key, spec in (given or {}).items():
        if key != cond_key:
            refuse(f"{where}.{key}", f"only the condition ({cond_key!r}, model.params.cond_stage_key) is dropped here")
        if not isinstance(spec, dict) or set(spec) - {"p", "val"} or "p" not in spec:
            refuse(f"{where}.{key}", f"expected {{p: <probability>, val: ''}}, got {spec!r}")
        if spec.get("val") not in (None, ""):
            refuse(f"{where}.{key}.val", f"{spec['val']!r}: only dropping to the empty condition ('') is supported")
        rate = float(spec["p"])
    return rate


def _schedule(p: Params) -> dict:
    schedule = p.take("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        p.refuse("beta_schedule", f"known: {', '.join(BETA_SCHEDULES)}")
    if schedule == "cosine":
        p.ignore("cosine_s", "diffusers' cosine schedule has s = 0.008", allowed=(8e-3,))
    else:
        p.ignore("cosine_s")  # read only by the cosine schedule
    parameterization = p.take("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        p.refuse("parameterization", "this project predicts eps or v")
    p.ignore("given_betas", "give the schedule by timesteps, linear_start, linear_end, beta_schedule", allowed=None)
    return {"timesteps": int(p.take("timesteps", 1000)), "linear_start": float(p.take("linear_start", 1e-4)),
            "linear_end": float(p.take("linear_end", 2e-2)), "beta_schedule": BETA_SCHEDULES[schedule],
            "parameterization": parameterization}


def _loss_and_training(p: Params, weights_given: bool) -> None:
    """Keys that must keep their default (this project trains the simple MSE loss), or change nothing here."""
    p.ignore("loss_type", "the loss is the mean squared error (l2)", allowed="l2")
    p.ignore("l_simple_weight", "the loss is not reweighted", allowed=(1, 1.0))
    p.ignore("original_elbo_weight", "the variational-bound term is not trained", allowed=(0, 0.0))
    p.ignore("v_posterior", "DDPM sampling uses the posterior variance beta-tilde (0)", allowed=(0, 0.0))
    learn = p.take("learn_logvar", False)
    if learn:
        p.refuse("learn_logvar", "a learned per-timestep loss weight is not trained here")
    p.ignore("logvar_init")  # only with learn_logvar
    p.ignore("use_positional_encodings", "no positional-encoding conditioning", allowed=False)
    p.ignore("num_timesteps_cond", "conditioning on a shortened timestep schedule is not supported", allowed=(None, 1))
    p.ignore("scale_by_std", "set scale_factor (0.18215 for SD's VAE)", allowed=False)
    p.ignore("cond_stage_forward", "the conditioner's own forward", allowed=None)
    p.ignore("log_every_t")  # the step of CompVis's progressive-denoising rows, which are not drawn here
    p.ignore("clip_denoised")  # LatentDiffusion never clips its predictions
    for name in ("ignore_keys", "load_only_unet", "make_it_fit"):  # only read with ckpt_path
        p.ignore(name)
    if "ckpt_path" in p:
        if not weights_given:
            p.refuse("ckpt_path", "pass the checkpoint as --finetune_from PATH (weights only, a new run)")
        p.take("ckpt_path")
        p.record.note("model.params.ckpt_path is not read: the weights come from --finetune_from/--ckpt")


def translate_model(section: dict, record: Record, weights_given: bool) -> tuple[dict, dict]:
    """The model section in this project's terms, and the CompVis batch keys it named (``first_stage_key``,
    ``cond_stage_key``) with the conditioner's kind (text or image), for checking the data section against."""
    where = "model"
    _check_model_section(section)
    record.block(where, LATENT_DIFFUSION, TARGETS[LATENT_DIFFUSION])
    p = Params(section.get("params"), "model.params", record)
    out: dict = _schedule(p)
    _loss_and_training(p, weights_given)
    key = p.take("conditioning_key")
    if key is None:  # CompVis's older spelling: concat_mode decides
        key = "concat" if p.take("concat_mode", True) else "crossattn"
    else:
        p.ignore("concat_mode")  # read only without conditioning_key
    if key != "crossattn":
        p.refuse("conditioning_key", "only cross-attention conditioning (crossattn) is supported")
    p.ignore("personalization_config", "textual-inversion embeddings are not trained here", allowed=None)

    latent = int(p.take("image_size", 256))
    unet_block = _check_target(p.take("unet_config"), "model.params.unet_config", UNET,
                               "only UNetModel translates", record)
    unet, checkpointing = unet_config(unet_block.get("params"), latent, record, "model.params.unet_config.params")
    record.block("model.params.unet_config", UNET, TARGETS[UNET])
    first = first_stage(p.take("first_stage_config"), latent, float(p.take("scale_factor", 1.0)), record,
                        weights_given)
    cond_key = p.take("cond_stage_key", "image")
    ucg = _ucg_rate(p.take("ucg_training"), cond_key, "model.params.ucg_training")
    cond, kind = conditioner(p.take("cond_stage_config"), bool(p.take("cond_stage_trainable", False)), ucg, record,
                             weights_given)
    first_key = p.take("first_stage_key", "image")
    if kind == "image" and cond_key != first_key:
        p.refuse("cond_stage_key", f"the image embedder reads the images themselves (first_stage_key {first_key!r})")
    latent_channels = first["params"]["config"]["latent_channels"]
    channels = int(p.take("channels", 3))
    for name, value in (("channels", channels), ("unet_config.params.in_channels", unet["in_channels"]),
                        ("unet_config.params.out_channels", unet["out_channels"])):
        if value != latent_channels:
            refuse(f"model.params.{name}", f"{value} differs from the first stage's {latent_channels} latent channels")
    trainable = p.take("unet_trainable", True)
    if trainable not in UNET_TRAINABLE:
        p.refuse("unet_trainable", "all (true), attn (cross-attention only) or conv_in")
    monitor = p.take("monitor", "val/loss")
    if monitor in MONITORS and monitor != "val/loss":
        record.note(f"model.params.monitor {monitor} → val/loss (this project's one validation loss)")
    scheduler = p.take("scheduler_config")
    if scheduler is not None and scheduler.get("target") != OUR_SCHEDULER:
        refuse("model.params.scheduler_config.target", f"{scheduler.get('target')!r}: only {OUR_SCHEDULER} "
               "translates (CompVis's cosine warm-up schedulers are not in ldm.lr_scheduler)")
    out.update({
        "first_stage_key": "image", "cond_stage_key": "caption" if kind == "text" else "image",
        "trainable": UNET_TRAINABLE[trainable], "use_ema": bool(p.take("use_ema", True)),
        "monitor": "val/loss" if monitor in MONITORS else monitor, "scheduler_config": scheduler,
        "unet_config": {"target": TARGETS[UNET], "params": {"config": unet, "gradient_checkpointing": checkpointing}},
        "first_stage_config": first, "cond_stage_config": cond,
    })
    p.finish("CompVis's LatentDiffusion")
    ours = {"target": TARGETS[LATENT_DIFFUSION], "params": out}
    if "base_learning_rate" in section:
        ours = {"base_learning_rate": section["base_learning_rate"], **ours}
    return ours, {"first_stage_key": first_key, "cond_stage_key": cond_key, "kind": kind}


def _check_model_section(section) -> None:
    if not isinstance(section, dict) or section.get("target") != LATENT_DIFFUSION:
        target = section.get("target") if isinstance(section, dict) else section
        refuse("model.target", f"{target!r} has no translation here; only {LATENT_DIFFUSION} translates "
               "(its inpainting, upscaling and other subclasses do not)")
    extra = sorted(set(section) - {"target", "params", "base_learning_rate"})
    if extra:
        refuse(f"model.{extra[0]}", "a model section holds base_learning_rate, target and params")
