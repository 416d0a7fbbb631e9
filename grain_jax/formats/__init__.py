"""What goes on disk: image files in and out (images), converted-weights directories
(weights) and the conversion of PyTorch checkpoints into them (convert). Imports only
grain_jax.util and grain_jax.nets.
"""
