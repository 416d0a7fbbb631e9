"""The built-in configs, one file each, that `--config NAME` loads by path (cli/config_flags.py
lists them): 1024 and small (model.py), invrrdb, fea2code, fusion and finetune (training.py),
grain1024 (pipeline.py) and demo, the quick start (demo.py). They build on
grain_jax/train/config.py and grain_jax/nets/model_config.py; the clone's configs/ folder
holds editable copies.
"""
