"""The LatentDiffusion LightningModule: composes a denoiser, a first stage, a conditioner, a noise schedule
and EMA, and owns the training step, the optimizer and sampling for the image logger and scripts."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Sequence

import pytorch_lightning as pl
import torch

from ldm.callbacks.faults import check_finite, last_good_checkpoint
from ldm.models.ema import EMA
from ldm.models.parts import Conditioner, FirstStage, WeightComponent, map_conditioning, where_dropped
from ldm.models.schedule import NoiseSchedule
from ldm.models.trainable import select_trainable
from ldm.optim import build_optimizer, default_optimizer_config
from ldm.sampling import default_sampler_config, resolve_sampler_config
from ldm.util import ConfigError, count_params, instantiate_from_config


class LatentDiffusion(pl.LightningModule):
    """Fine-tune (or train) a text- or image-conditioned latent diffusion model.

    Args mirror CompVis's config names where they exist: ``unet_config``, ``first_stage_config``,
    ``cond_stage_config`` are ``{target, params}`` blocks; ``pretrained`` (a local diffusers pipeline folder)
    is handed to each of them unless their own params name one; ``timesteps``/``linear_start``/``linear_end``/
    ``beta_schedule``/``parameterization`` define the noise schedule; ``trainable`` picks the denoiser
    parameters that train (see ``ldm.models.trainable``); ``use_ema``/``ema_decay`` keep an EMA of them, used
    for samples when ``sample_with_ema``; ``scheduler_config`` builds an LR multiplier for ``LambdaLR``.
    ``prior_loss_weight`` scales the class-image loss of DreamBooth batches (those with ``class_image``);
    ``lora`` (``{rank, alpha, ...}``, see ``ldm.lora.add_lora``) trains low-rank adapters instead of weights.
    ``sampler_config`` holds diffusers scheduler settings (``clip_sample``, ``timestep_spacing``, ``steps_offset``,
    ``rescale_betas_zero_snr``, ...) over the defaults for this model (``ldm.sampling.default_sampler_config``):
    every sampler of the image logger, the eval callbacks and the scripts is built from them, and checkpoints and
    exports record them. A diffusers folder's ``scheduler/scheduler_config.json`` arrives here whole.
    ``val_timesteps`` (a count: the centres of that many equal bins of the schedule; or a list) are the timesteps ``val/loss`` is
    measured at, each with the same noise for the same image at every validation (``ldm.models.diffusion``'s
    ``validation_losses``), so the number moves only when the weights do.
    ``monitor`` is CompVis's key: the metric ``lightning.modelcheckpoint`` keeps its best checkpoints by when
    it sets ``save_top_k`` without a ``monitor`` of its own.
    Training options, all off by default (README "Training options"): ``noise_offset``, ``input_perturbation`` and
    ``zero_terminal_snr`` (see ``ldm.models.schedule.NoiseSchedule``); ``optimizer_config`` (a ``{target, params}``
    block, see ``ldm.optim``; default AdamW with ``weight_decay``/``adam_betas``/``adam_eps``); ``ema_device: cpu``
    and ``ema_update_every`` (see ``ldm.models.ema.EMA``).
    """

    def __init__(self, unet_config: dict, first_stage_config: dict, cond_stage_config: dict,
                 pretrained: str | None = None, first_stage_key: str = "image", cond_stage_key: str = "caption",
                 timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", parameterization: str = "eps", snr_gamma: float | None = None,
                 trainable: str | Sequence[str] = "all", use_ema: bool = False, ema_decay: float = 0.9999,
                 sample_with_ema: bool = True, scheduler_config: dict | None = None, weight_decay: float = 0.01,
                 adam_betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8, monitor: str = "val/loss",
                 prior_loss_weight: float = 1.0, lora: dict | None = None, sampler_config: dict | None = None,
                 noise_offset: float = 0.0, input_perturbation: float = 0.0, zero_terminal_snr: bool = False,
                 optimizer_config: dict | None = None, ema_device: str | None = None, ema_update_every: int = 1,
                 val_timesteps: int | Sequence[int] = 5):
        super().__init__()
        self.save_hyperparameters()
        self.unet = self._build(unet_config, pretrained)
        self.first_stage_model = self._build(first_stage_config, pretrained)
        self.cond_stage_model = self._build(cond_stage_config, pretrained)
        for name, part, interface in (("first_stage_config", self.first_stage_model, FirstStage),
                                      ("cond_stage_config", self.cond_stage_model, Conditioner)):
            if not isinstance(part, interface):
                raise ConfigError(f"model.params.{name}: {type(part).__name__} is not a {interface.__module__}."
                                  f"{interface.__name__} (the interface the rest of the project relies on)")
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.schedule = NoiseSchedule(timesteps, linear_start, linear_end, beta_schedule, parameterization, snr_gamma,
                                      noise_offset, input_perturbation, zero_terminal_snr)
        if zero_terminal_snr and self.schedule.prediction_type == "epsilon":
            # At SNR 0 the input is pure noise: predicting it says nothing of the image, and DDIM/DDPM divide by 0.
            raise ConfigError("model.params.zero_terminal_snr: true needs parameterization: v (an epsilon model's "
                              "samples are NaN from the first, SNR-0 step of DDIM and DDPM); got parameterization: eps")
        self.sampler_config = resolve_sampler_config(
            sampler_config, default_sampler_config(self.schedule.scheduler_config()))
        self.trainable_names = select_trainable(self.unet, trainable)
        if lora:  # low-rank adapters replace `trainable`: only they train (ldm.lora)
            from ldm.lora import add_lora

            self.trainable_names = add_lora(self, **lora)
        self.prior_loss_weight = prior_loss_weight
        self.use_ema, self.sample_with_ema = use_ema, sample_with_ema
        self.model_ema = EMA(self.unet, ema_decay, device=ema_device, update_every=ema_update_every) if use_ema else None
        self.optimizer_config = optimizer_config
        self.scheduler_config = scheduler_config
        self.learning_rate = 1e-4  # main.py sets the (possibly scaled) base_learning_rate
        self.monitor = monitor
        self.val_timesteps = self._val_timesteps(val_timesteps, timesteps)

    @staticmethod
    def _val_timesteps(given: int | Sequence[int], timesteps: int) -> list[int]:
        if isinstance(given, int):
            if given < 1:
                raise ConfigError(f"model.params.val_timesteps: a count >= 1 or a list of timesteps, got {given}")
            # The centres of `given` equal bins: t = 0 is left out, where predicting the (barely applied) noise is
            # ill-posed and its large, erratic loss would drown every other timestep's.
            return sorted({int((i + 0.5) * timesteps / given) for i in range(given)})  # no tensors: meta-safe
        chosen = sorted({int(t) for t in given})
        if not chosen or chosen[0] < 0 or chosen[-1] >= timesteps:
            raise ConfigError(f"model.params.val_timesteps: {list(given)} must be timesteps in 0..{timesteps - 1}")
        return chosen

    @staticmethod
    def _build(config: dict, pretrained: str | None):
        params = config.get("params") or {}
        extra = {"pretrained": pretrained} if pretrained is not None and "pretrained" not in params else {}
        return instantiate_from_config(config, **extra)

    def summary(self) -> str:
        parts = {"unet": self.unet, "first stage": self.first_stage_model, "conditioner": self.cond_stage_model}
        sizes = ", ".join(f"{k} {count_params(m):,}" for k, m in parts.items())
        return f"LatentDiffusion: {sizes}; trainable {count_params(self, trainable_only=True):,}"

    # ---- training -------------------------------------------------------------------------------------
    def conditioning(self, batch: dict, drop: torch.Tensor | None = None):
        """The batch's conditioning (``ldm.models.parts``): its captions' (or images') context, encoded or cached,
        with the size conditioning of its images for micro-conditioned models (SDXL)."""
        cond = batch.get(self.cond_stage_key + "_context")  # ldm.data.cache: encoded once, before training
        if cond is None:
            with self.parts_on_device(self.cond_stage_model):
                cond = self.cond_stage_model(batch[self.cond_stage_key], drop)
            cond = map_conditioning(lambda x: x.to(self.device), cond)
        elif drop is not None and bool(drop.any()):
            cond = where_dropped(drop, self._cached_unconditional, cond)
        return self.cond_stage_model.with_sizes(cond, *self._image_sizes(batch))

    def _image_sizes(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, 2) target ``(h, w)`` (the size trained at), and the bucket's ``original_size`` and ``crop_top_left``
        when the batch has them (``ldm.data.buckets``); without buckets they default to the target and (0, 0)."""
        images = batch.get(self.first_stage_key)
        if images is None:
            moments = batch[self.first_stage_key + "_moments"]
            n, size = len(moments), [s * self.first_stage_model.downsample for s in moments.shape[-2:]]
        else:
            n, size = len(images), list(images.shape[-2:])
        target = torch.tensor([size] * n, device=self.device)
        return target, batch.get("original_size"), batch.get("crop_top_left")

    def latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's latents: drawn from cached posteriors (``<key>_moments``) or encoded from its images."""
        moments = batch.get(self.first_stage_key + "_moments")
        if moments is not None:
            return self.first_stage_model.sample_moments(moments, generator)
        with self.parts_on_device(self.first_stage_model):
            return self.first_stage_model.encode(batch[self.first_stage_key].to(self.device), generator)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None, train: bool = True) -> torch.Tensor:
        z = self.latents(batch, generator)
        drop = None
        rate = self.cond_stage_model.ucg_rate
        if train and rate > 0:
            drop = torch.rand(z.shape[0], device=z.device, generator=generator) < rate
        context = self.conditioning(batch, drop)
        noise = torch.randn(z.shape, device=z.device, generator=generator, dtype=z.dtype)
        t = self.schedule.sample_timesteps(z.shape[0], z.device, generator)
        # Offset noise and input perturbation (off by default) draw after everything above; not in validation.
        noise, input_noise = self.schedule.training_noise(noise, generator) if train else (noise, noise)
        z_t = self.schedule.add_noise(z, input_noise, t)
        pred = self.denoise(z_t, t, context)
        return self.schedule.loss(pred, self.schedule.target(z, noise, t), t)

    # ---- parts that leave the accelerator when their outputs are cached ---------------------------------------
    def on_fit_start(self) -> None:
        # The DataModule's caches need these encoders on the device, and DreamBooth's class images, which
        # callbacks make in their on_fit_start (they run before this hook): so they are filled from here.
        data = self.trainer.datamodule if self.trainer else None
        if hasattr(data, "prepare_caches"):
            data.prepare_caches(self, self.device, self.trainer.default_root_dir)
        cached = getattr(data, "cached_inputs", frozenset())
        self._offloaded = []
        if "text" in cached:
            with torch.no_grad():
                self._cached_unconditional = map_conditioning(torch.Tensor.detach,
                                                              self.cond_stage_model.unconditional(1))
            self._offloaded.append(self.cond_stage_model)
        if "latents" in cached:
            self._offloaded.append(self.first_stage_model)
        for part in self._offloaded:  # their memory goes to the UNet, its gradients and optimizer state
            part.to("cpu")

    @contextmanager
    def parts_on_device(self, *parts):
        """Bring offloaded ``parts`` (all by default) to the model's device for the block: sampling, validation."""
        moved = [p for p in (parts or getattr(self, "_offloaded", [])) if p in getattr(self, "_offloaded", [])]
        for part in moved:
            part.to(self.device)
        try:
            yield
        finally:
            for part in moved:
                part.to("cpu")

    def training_step(self, batch, batch_idx):
        loss = self.diffusion_loss(batch)
        if "class_caption" in batch:  # DreamBooth prior preservation (ldm.data.dreambooth): the class half's loss
            prior = self.diffusion_loss({key.replace("class_image", self.first_stage_key)
                                         .replace("class_caption", self.cond_stage_key): value
                                         for key, value in batch.items() if key.startswith("class_")})
            n = len(batch["class_caption"])
            self.log("train/instance_loss", loss, on_step=True, on_epoch=False, batch_size=n)
            self.log("train/prior_loss", prior, on_step=True, on_epoch=False, batch_size=n)
            loss = loss + self.prior_loss_weight * prior
        # Stop before backward and before any checkpoint of this step: earlier checkpoints stay good.
        loss = check_finite(loss, self.global_step, last_good_checkpoint(self.trainer))
        # The per-step value is this rank's (an all-reduce every step would stall multi-GPU training);
        # the epoch mean is averaged over all ranks, once per epoch.
        n = len(batch[self.cond_stage_key])
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step (not per micro-batch), and here rather than in on_train_batch_end: the callbacks'
        # on_train_batch_end (a checkpoint every n steps) run before the module's and would save an EMA one update
        # behind the weights. global_step counts this step only once the hook returns.
        if self.model_ema is not None and self.model_ema.due(self.global_step + 1):
            self.model_ema.update(self.unet)

    @torch.no_grad()
    def validation_losses(self, batch: dict, batch_idx: int = 0) -> dict[int, torch.Tensor]:
        """``{timestep: mean loss}`` at :attr:`val_timesteps`, with noise (and the posterior draw) fixed per image.

        Image ``i``'s draws come from a generator seeded with its dataset index (``batch["index"]``, which the
        DataModule adds to validation items), so an image gets the same noise at every validation, in any batch,
        after a resume and on any rank. The loss is the plain mean squared error of the prediction target."""
        from ldm.sampling import noise

        n = len(batch[self.cond_stage_key])
        index = batch["index"].tolist() if "index" in batch else [batch_idx * n + i for i in range(n)]
        generators = [torch.Generator().manual_seed(1_000_003 + int(i)) for i in index]
        moments = batch.get(self.first_stage_key + "_moments")
        if moments is None:
            with self.parts_on_device(self.first_stage_model):
                moments = self.first_stage_model.encode_moments(batch[self.first_stage_key].to(self.device))
        z = self.first_stage_model.sample_moments(moments.to(self.device), generators)
        eps = noise(z.shape, generators, z.device, z.dtype)
        context = self.conditioning(batch)
        losses = {}
        for step in self.val_timesteps:
            t = torch.full((n,), step, device=z.device, dtype=torch.long)
            pred = self.denoise(self.schedule.add_noise(z, eps, t), t, context)
            losses[step] = torch.nn.functional.mse_loss(pred.float(), self.schedule.target(z, eps, t).float())
        return losses

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if self.first_stage_key not in batch and self.first_stage_key + "_moments" not in batch:
            return None  # text-only validation batches are for the image logger
        with self.ema_scope():
            losses = self.validation_losses(batch, batch_idx)
        n = len(batch[self.cond_stage_key])
        kwargs = dict(on_epoch=True, sync_dist=True, batch_size=n, add_dataloader_idx=False)
        for step, value in losses.items():
            self.log(f"val/loss_t{step:04d}", value, **kwargs)
        loss = torch.stack(list(losses.values())).mean()
        self.log("val/loss", loss, prog_bar=True, **kwargs)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        config = self.optimizer_config or default_optimizer_config(
            self.hparams.weight_decay, self.hparams.adam_betas, self.hparams.adam_eps)
        opt = build_optimizer(params, self.learning_rate, config)
        if self.scheduler_config is None:
            return opt
        lr_lambda = instantiate_from_config(self.scheduler_config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ---- EMA and sampling -----------------------------------------------------------------------------
    @contextmanager
    def eval_mode(self):
        """Eval mode for sampling in the middle of training (callbacks), then back to what it was."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @contextmanager
    def ema_scope(self):
        """Swap EMA weights in for sampling/validation when configured; the training weights come back after."""
        if self.model_ema is not None and self.sample_with_ema:
            with self.model_ema.swapped_in(self.unet):
                yield
        else:
            yield

    def default_image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.first_stage_model.downsample

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: pixels per latent cell times the UNet's downsampling."""
        return self.first_stage_model.downsample * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        down = self.first_stage_model.downsample
        return n, self.first_stage_model.latent_channels, height // down, width // down

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The network's prediction (noise or v): the one place the UNet is called, in training and sampling.
        ``cond`` is a conditioning (``ldm.models.parts``): the context, or a dict of it and the UNet's added
        conditions (SDXL's pooled ``text_embeds`` and ``time_ids``)."""
        if isinstance(cond, dict):
            added = {k: v for k, v in cond.items() if k != "context"}
            return self.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def weight_components(self) -> list[WeightComponent]:
        """Every library network this model holds, with its state-dict prefix and file layouts (``ldm.weights``)."""
        unet = WeightComponent("unet.", "unet", "unet", self.unet)
        return [unet] + [c.under("first_stage_model.") for c in self.first_stage_model.weight_components()] + \
            [c.under("cond_stage_model.") for c in self.cond_stage_model.weight_components()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The settings this model samples with, resolved: a later change of defaults never changes its samples.
        checkpoint["sampler_config"] = dict(self.sampler_config)

    @torch.no_grad()
    def generate(self, conds: Sequence[str] | torch.Tensor, seeds: Sequence[int] | None = None,
                 size: int | tuple | None = None, sampler: str = "ddim", steps: int = 50, guidance_scale: float = 3.0,
                 negative_prompt: str = "", eta: float = 0.0, use_ema: bool = True) -> torch.Tensor:
        """Sample one image per condition, each with its own seed, and return them in [-1, 1].

        ``conds`` is whatever the conditioner takes: captions, or a (B,C,H,W) image tensor in [-1, 1] for image
        variations. Every random draw of image ``i`` comes from its own generator seeded with ``seeds[i]``, so a
        prompt and seed give the same image whatever else is in the batch. This is ``ldm.sampling.txt2img`` with one
        generator per image, the path the scripts use and the tests hold to diffusers' pipelines.
        """
        from ldm.sampling import txt2img

        size = size or self.default_image_size()
        height, width = (size, size) if isinstance(size, int) else size
        seeds = list(seeds) if seeds is not None else list(range(len(conds)))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with self.eval_mode(), self.parts_on_device(), self.ema_scope() if use_ema else nullcontext():
            images = txt2img(self, conds, height, width, negative_prompt, generators, sampler, steps,
                             guidance_scale, eta)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict, n: int = 4, sizes=None, **sample_kwargs) -> dict[str, torch.Tensor]:
        """Images for the logger: inputs and reconstructions when the batch has images, and guided samples.

        Samples are drawn at the batch's size (its images', cached latents', or text-only prompts' ``height`` x
        ``width``; a batch of several sizes gives a grid per size), or at each of ``sizes`` (``[[h, w], ...]``)."""
        out = {}
        conds = batch[self.cond_stage_key][:n]  # captions, or the images themselves for image variations
        seeds = batch["seed"][:n].tolist() if "seed" in batch else list(range(len(conds)))
        rows = list(range(len(conds)))
        if self.first_stage_key in batch:
            x = batch[self.first_stage_key][:n].to(self.device)
            out["inputs"] = x
            with self.parts_on_device(self.first_stage_model):
                out["reconstruction"] = self.first_stage_model.decode(self.first_stage_model.encode(x)).clamp(-1, 1)
            sample_kwargs.setdefault("size", tuple(x.shape[-2:]))
        elif self.first_stage_key + "_moments" in batch:  # cached latents: the posterior means, decoded
            mean = batch[self.first_stage_key + "_moments"][:n].chunk(2, dim=1)[0].to(self.device)
            with self.parts_on_device(self.first_stage_model):
                out["reconstruction"] = self.first_stage_model.decode(mean * self.first_stage_model.scale_factor)
            out["reconstruction"] = out["reconstruction"].clamp(-1, 1)
            sample_kwargs.setdefault("size", tuple(out["reconstruction"].shape[-2:]))
        scale = sample_kwargs.get("guidance_scale", 3.0)
        if sizes:
            groups = {tuple(int(v) for v in ([s, s] if isinstance(s, int) else s)): rows for s in sizes}
        elif "height" in batch and "size" not in sample_kwargs:  # text-only prompts with their output_size(s)
            groups = {}
            for i in rows:
                groups.setdefault((int(batch["height"][i]), int(batch["width"][i])), []).append(i)
        else:
            groups = {sample_kwargs.pop("size", None): rows}
        sample_kwargs.pop("size", None)
        for size, idx in groups.items():
            key = f"samples_cfg{scale:g}" + (f"_{size[1]}x{size[0]}" if len(groups) > 1 or sizes else "")
            picked = conds[idx] if isinstance(conds, torch.Tensor) else [conds[i] for i in idx]
            out[key] = self.generate(picked, [seeds[i] for i in idx], size=size, **sample_kwargs)
        return out
