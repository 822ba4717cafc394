"""The check after every LoRA export: read the written file back through diffusers' own loaders and count what lands.

The file goes through ``StableDiffusionPipeline.lora_state_dict`` (``StableDiffusionXLPipeline``'s for SDXL; either
parses both layouts) and
``load_lora_into_unet`` / ``load_lora_into_text_encoder`` onto networks of the same configs built on the meta device
(no initialisation and no memory but the adapters'). What diffusers built is written out again by our own writer
(``ldm.lora_files``); a stored tensor counts as applied when it comes back under its own name with its own values,
an ``.alpha`` when the layer's rank and alpha (its strength) give it again. Anything else applied nowhere, or
somewhere else, and is named in a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.lora_files import adapter_of, diffusers_layout, is_sdxl, kohya_layout, layout_of, lora_pipeline, read_lora

log = logging.getLogger(__name__)
CHECK = "export_check"  # adapter name the check loads under


@dataclass
class CheckResult:
    path: Path
    layout: str
    total: int
    unused: list[str] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return self.total - len(self.unused)

    def line(self) -> str:
        return (f"lora check: {self.path.name} ({self.layout} layout) through diffusers' loader: "
                f"{self.applied} of {self.total} tensors applied")


def _meta_networks(model) -> dict:
    """Networks of the model's configs, ``{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}``, built on
    the meta device and given uninitialised CPU storage: peft moves each adapter onto its base layer's device (a meta
    base would drop the loaded values), and storage nobody writes costs no memory, so even SD's UNet is free here."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        networks = {"unet": UNet2DConditionModel.from_config(model.unet.config)}
        for prefix, module in model.cond_stage_model.lora_modules().items():
            networks[prefix] = type(module)(module.config)
    return {prefix: network.to_empty(device="cpu") for prefix, network in networks.items()}


def check_lora_file(model, path: str | Path) -> CheckResult:
    """Load ``path`` as diffusers would and count the tensors applied; print the count, warn once per unused key."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    layout = layout_of(stored)
    networks = _meta_networks(model)
    sdxl = is_sdxl(model)
    pipeline = lora_pipeline(sdxl)  # SDXL's loaders read both text encoders' names
    state, alphas, meta = read_lora(path, unet_config=model.unet.config, sdxl=sdxl)
    pipeline.load_lora_into_unet(state, alphas, networks["unet"], adapter_name=CHECK, metadata=meta,
                                 low_cpu_mem_usage=True)
    for prefix in ("text_encoder", "text_encoder_2"):
        if prefix in networks and any(k.startswith(prefix + ".") for k in state):
            pipeline.load_lora_into_text_encoder(state, alphas, networks[prefix], prefix=prefix, adapter_name=CHECK,
                                                 metadata=meta, low_cpu_mem_usage=True)
    # What diffusers built, written out again by our own writer: a stored tensor applied if it comes back
    # under its name with its values (an alpha: the layer's rank and alpha give it again).
    landed = [adapter_of(prefix, network, CHECK) for prefix, network in networks.items()
              if CHECK in (getattr(network, "peft_config", None) or {})]
    again = (kohya_layout(landed, {}, sdxl) if layout == "kohya" else diffusers_layout(landed))[0] if landed else {}
    result = CheckResult(path, layout, len(stored))
    for key, tensor in stored.items():
        value = again.get(key)
        if value is None or value.device.type == "meta" or not torch.equal(value.to(tensor.dtype), tensor):
            result.unused.append(key)
    print(result.line(), flush=True)
    for key in result.unused:
        log.warning("lora check: %s: tensor %r applied nowhere in diffusers' loader", path.name, key)
    return result
