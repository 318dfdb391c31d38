"""Two-pass inference with many SVF experts: per prompt, the experts the router picks, their weights, the answer.

    python scripts/infer.py --model smollm2-135m --experts runs/a/expert runs/b/expert --router embedding \
        --prompt "The occupation of Martín Solares is"     # experts from scripts/train_rl.py
    python scripts/infer.py --experts runs/comp/experts-k4/expert-000*/expert --router embedding \
        --prompts prompts.txt --json            # no --model: the built-in fact world

Same as `t2edit infer`. See the README section "Many experts: routing, composition, sequential editing".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2edit.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
