"""opdgeo: on-policy distillation, its parameter delta, and the geometry of that delta."""
