"""Training: data, EDM teacher, one-step students, initialisation specs, ablations, metrics."""
