"""Fine-tuning Stable Diffusion with PyTorch Lightning, driven by YAML configs."""
