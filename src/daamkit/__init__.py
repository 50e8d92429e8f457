"""daamkit: Diffusion Attentive Attribution Maps for diffusers pipelines."""

__version__ = "0.1.0"
