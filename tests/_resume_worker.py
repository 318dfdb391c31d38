"""Run by tests/test_training.py in a subprocess: train a few REINFORCE steps on a saved tiny world."""
import sys
import time

import torch

torch.set_num_threads(1)


def main(world_dir: str, output_dir: str, steps: int, resume: bool, step_delay: float):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_training import tiny_edits
    from t2edit.svf import apply_svf
    from t2edit.training import SVFTrainer, TrainConfig

    model = AutoModelForCausalLM.from_pretrained(world_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(world_dir)
    tokenizer.padding_side = "left"
    edits, neighbours = tiny_edits()
    config = TrainConfig(output_dir=output_dir, steps=steps, save_every=2, eval_every=0, 
                         edits_per_step=2, neighbours_per_step=2, group_size=3, resume=resume, progress=False,
                         kl_coef=0.1)
    svf = apply_svf(model, config.svf_config(), progress=False)
    trainer = SVFTrainer(svf, tokenizer, edits, neighbours, config)
    step = trainer.training_step

    def slow_step():
        metrics = step()
        time.sleep(step_delay)
        return metrics

    trainer.training_step = slow_step
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume", float(sys.argv[5]))
