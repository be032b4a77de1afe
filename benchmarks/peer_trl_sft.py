"""The peer run for bench_fine_tuning.py: TRL's SFTTrainer with a PEFT LoRA config, called directly, as its
documentation shows. Same model, data, LoRA recipe and optimizer settings as vbatch's trainer.

Usage: python benchmarks/peer_trl_sft.py MODEL_DIR TRAIN_JSONL OUTPUT_DIR HYPERPARAMETERS_JSON
"""

import json
import os
import sys


def main() -> None:
    model_dir, train_file, output_dir, hp = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=os.path.join(output_dir, "trainer"), num_train_epochs=hp["n_epochs"],
                     per_device_train_batch_size=hp["batch_size"], learning_rate=hp["learning_rate"],
                     max_length=hp["max_length"], seed=1, data_seed=1, assistant_only_loss=True, use_cpu=True, bf16=False,
                     save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=train_file)["train"],
                         processing_class=tokenizer, peft_config=lora)
    output = trainer.train()
    trainer.model.save_pretrained(os.path.join(output_dir, "adapter"))
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump({"steps": output.global_step, "train_loss": output.training_loss,
                   "train_seconds": output.metrics["train_runtime"]}, f)


if __name__ == "__main__":
    main()
