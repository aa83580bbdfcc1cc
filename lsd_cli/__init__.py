"""The `lsd` command (`lsd_cli.main`, also `python -m lsd_cli`): the parser and every subcommand,
above the packages they drive. Nothing in `lsd_jax`, `lsd_train`, `lsd_serve` or `lsd_kernels`
imports it.

- `main`: the parser and `main`, which runs a command and turns user errors into one line;
- `args`: argument types, and `--config` with trailing `key.path=value` overrides;
- `output`: how results are printed for a reader;
- `platforms`: which JAX platforms a command may start (no TPU probing without a TPU);
- `info`: `lsd info`; `bench`: `lsd bench step`, `lsd bench kernels` (the other groups add their
  own benchmarks to `lsd bench`);
- `interop`: `lsd convert oasis`, `lsd parity`, `lsd bench parity-speed`, `lsd oasis`;
- `evaluate`: `lsd eval`; `train`: `lsd train`, `lsd bench train`, `lsd ship-demo`,
  `lsd cost-model`;
- `serve`: `lsd export`, `lsd stream`, `lsd serve`, `lsd bench serve`, `lsd bench long-stream`;
- `data`: `lsd data encode`, `lsd data random-codec`, `lsd data demo-clip`;
- `kernels`: `lsd kernels tpu-aot`, `lsd kernels triton-aot`.

A command module imports what starts without Flax at its top; the model code, Flax, training and
torch are imported by the run function of the command that needs them, so `lsd --help` and every
other command start without them.
"""
