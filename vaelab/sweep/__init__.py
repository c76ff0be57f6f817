"""vaelab's Optuna sweeps: a Hydra sweeper plugin any Hydra app can use, and the job's side.

- `sweeper`: the plugin class and its config node (`hydra/sweeper=vaelab_optuna`); vaelab's own
  settings of it are conf/hydra/sweeper/vaelab.yaml.
- `trial`: a training job's view of its Optuna trial (per-epoch pruning, its constraints).
- `storage`: an Optuna storage from a config string (a journal file or a database URL).
- `summary`: the end-of-sweep summary and optimization_results.yaml.
- `record`, `plots`: the sweep's MLflow parent run and its figures, used only when the sweeper
  has a `tracking` node.

Layer 2: imports vaelab.config, vaelab.errors and vaelab.tracking, never an entry point. This
package's __init__ imports nothing: Hydra imports the plugin module in every app it starts.
"""
