"""`python -m RL.main` is Monet's and EasyR1's command for RL training: it runs VLPO (`RL/train_vlpo.py`), so their
users' scripts carry over. New code names the entry it means: `RL.train_vlpo`, `RL.train_sft`,
`RL.train_self_evolution`."""
import runpy

if __name__ == "__main__":
    runpy.run_module("RL.train_vlpo", run_name="__main__")
