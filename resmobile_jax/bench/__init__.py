"""`python -m resmobile_jax.bench`: this project against the PyTorch reference model, same machine, same inputs."""
