"""`python -m vaelab.downstream run_id=...`: the earlier name of `python -m vaelab.evaluate`,
kept so that commands written before the rename still run."""

import runpy

if __name__ == "__main__":
    # As if `python -m vaelab.evaluate` had been typed: Hydra finds conf/ from that module.
    runpy.run_module("vaelab.evaluate", run_name="__main__", alter_sys=True)
