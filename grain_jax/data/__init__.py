"""Where images come from: random-access sources of folders and TFDS splits (sources), the
training batches drawn from them (input_pipeline), and users' photos cut into aligned faces
(face_align). Imports only grain_jax.util, nets and formats.
"""
