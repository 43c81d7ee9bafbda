"""How a run spreads over devices and hosts: the mesh and its logical axis rules, jax.distributed."""
