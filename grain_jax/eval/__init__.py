"""Judging a model: per-image metrics (metrics: one row per metric), the jitted evaluation
step (evaluator), evaluation over a dataset (evaluate: `grain-jax evaluate`), FID and KID
(fid: `grain-jax fid`), the HTML report and comparison pictures (report, report.html), and
the random-weights round trip (round_trip: `grain-jax demo`). Imports only the layers below:
util, nets, formats, data and the inference API.
"""
