"""The networks: Flax modules that compute, and how each is built, initialised and converted.

Layers (layers), PyTorch state dicts (torch_import), the 8-bit quantizer (quantizer), GRAIN's
networks (invrrdb: the rescaler, fea2code, stylegan2, fusion, discriminators), the loss and
metric networks (lpips, irse50, inception), the network registry (registry: one row per
network), the composed model (model) and the model configs (model_config). May import
grain_jax.util, nothing else of grain_jax.
"""
