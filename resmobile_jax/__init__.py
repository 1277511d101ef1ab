"""resmobile_jax: ResMobileNet V1/V2 image-embedding networks for retrieval, in JAX/Flax."""
