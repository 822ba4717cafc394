"""Pretrained weights in and out.

In: ``load_weights(model, path)`` (``--finetune_from``) and ``load_model(path, config=None, ema=True)`` (sampling
scripts, export) accept this project's run dirs and training checkpoints, diffusers pipeline folders (or a bare
``unet/`` folder for ``load_weights``), original CompVis/Stability single files (``.ckpt`` unpickled with
``weights_only=True``, or ``.safetensors``; SD v1 and SD 2.x, with or without EMA), and this project's exports.
Out: ``prepare(path)`` then ``export_diffusers`` / ``export_single_file`` (``scripts/convert.py``).

Modules: ``files`` (reading/writing safetensors and pickles), ``original`` (the original layout ↔ ours),
``source`` (what a path holds), ``load`` and ``export``.
"""
from ldm.weights.export import Exportable, export_diffusers, export_single_file, prepare
from ldm.weights.load import load_model, load_weights, model_description
from ldm.weights.original import describe
from ldm.weights.source import model_config_from_folder, open_weights

__all__ = ["Exportable", "describe", "export_diffusers", "export_single_file", "load_model", "load_weights",
           "model_config_from_folder", "model_description", "open_weights", "prepare"]
