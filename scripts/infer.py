"""Two-pass inference with many SVF experts (the same command as `t2edit infer`): per prompt, the experts the
router picks, their weights, the answer.

    python scripts/infer.py --model smollm2-135m --experts runs/a/expert runs/b/expert --router embedding \
        --prompt "The occupation of Martín Solares is"
    python scripts/infer.py --experts runs/comp/experts-k4/expert-000*/expert --prompts prompts.txt --json
"""
import sys

from t2edit.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
