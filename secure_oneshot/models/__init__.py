"""Model builders: classifiers (torchvision blocks) and the diffusion generator (diffusers)."""
