"""Where a run can fail that is no fault of its config: signals and faults of the machine. No JAX here."""
