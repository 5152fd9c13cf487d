"""minisd: Stable Diffusion from scratch."""
