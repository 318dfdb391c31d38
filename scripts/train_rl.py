"""Train one SVF expert with REINFORCE (the same command as `t2edit train`).

    accelerate launch --num_processes 1 --mixed_precision no scripts/train_rl.py --config configs/demo.yaml
    accelerate launch scripts/train_rl.py --config configs/knowedit_llama3.2-1b.yaml --resume

Any config key can be overridden on the command line (--steps 50, --rewards '{"exact_match": 1.0}').
"""
import sys

from t2edit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
