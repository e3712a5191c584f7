"""onestep-probe: train one-step diffusion generators and look inside them."""

__version__ = "0.1.0"
