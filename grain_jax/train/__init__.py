"""Training GRAIN's four stages: the stages (stages: one row each), their configs (config),
the losses (losses: one row per term), optimizers (optim), where the networks start
(initial_weights, resample_start), the train state and the jitted step (state, step), the
loop of one stage (loop) with its checkpoints, summaries, validation and stopping, stages in
sequence (pipeline), the quick start (quickstart), what a config asks for (launch) and the
benchmark (bench). Imports every layer below it, never the command line.
"""
