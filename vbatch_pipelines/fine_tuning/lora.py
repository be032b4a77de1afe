"""LoRA fine-tuning of a chat model, supervised (SFT) or on preference pairs (DPO), run out of process through
Dagster Pipes.

Standalone on purpose: it imports only ``dagster_pipes`` and the training stack, never vbatch, so it runs
in whichever environment has the right pins: this one (TRL + PEFT, CPU or GPU) or the Unsloth env (CUDA).
The orchestrating asset passes everything as Pipes extras and receives progress as custom messages:

- ``{"type": "metrics", step, total_steps, epoch, loss, learning_rate, eta_seconds, elapsed_seconds}``
- ``{"type": "checkpoint", step, epoch, path, metrics}`` at the end of each epoch (adapter only)

The outcome (``adapter_dir, merged_dir, train_loss, eval_loss, trained_tokens, steps, ...``) is written last,
atomically, to ``<output_dir>/result.json`` (RESULT_FILE): a file on disk survives what a message stream may
drop (a reader that stops early, a run that dies after training), and its presence means training finished.

Unsloth is chosen only when ``torch.cuda.is_available()``: importing it without a GPU raises.

A DPO job (``method: "dpo"``) reads TRL's conversational preference format (prompt, chosen, rejected) and trains
with TRL's DPOTrainer (patched by Unsloth on its path). With ``initial_adapter`` (a fine-tune it continues) that
adapter is trained further and a frozen copy of it is the reference; otherwise a fresh LoRA, with the base as the
reference. Before and after training it measures the held-out preference accuracy: the share of eval pairs whose
chosen answer the model gives a higher log-probability than the rejected one.
"""

import importlib.util
import json
import math
import os
import signal
import sys
import time

RESULT_FILE = "result.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def choose_backend(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "unsloth" if cuda and importlib.util.find_spec("unsloth") is not None else "trl"
    if requested == "unsloth" and not cuda:
        raise RuntimeError("The unsloth trainer needs a CUDA GPU and torch.cuda.is_available() is False here; "
                           "use the trl trainer (VBATCH_TRAINER=trl) on CPU")
    if requested not in ("unsloth", "trl"):
        raise ValueError(f"trainer backend must be auto, unsloth or trl, got {requested!r}")
    return requested


def target_modules(model) -> list[str]:
    """The usual attention and MLP projections that this model has (LoRA's standard recipe)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in LORA_TARGETS if t in names]
    if not found:
        raise ValueError(f"None of the LoRA target modules {LORA_TARGETS} exist in this model")
    return found


def load_unsloth(base: str, hp: dict, seed: int, initial_adapter: str | None = None):
    from unsloth import FastLanguageModel  # before transformers/trl: it patches them

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=base, max_seq_length=hp["max_length"], dtype=None, load_in_4bit=bool(hp.get("qlora")))
    if initial_adapter:
        return continued(model, initial_adapter), tokenizer, None
    model = FastLanguageModel.get_peft_model(
        model, r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=hp.get("lora_dropout", 0.0),
        target_modules=target_modules(model), bias="none", use_gradient_checkpointing="unsloth",
        random_state=seed)
    return model, tokenizer, None


def continued(model, adapter: str):
    """``model`` with the adapter of the fine-tune a job continues, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def load_trl(base: str, hp: dict, seed: int, initial_adapter: str | None = None):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    kwargs = {"dtype": dtype}
    if hp.get("qlora"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if initial_adapter:
        return continued(model, initial_adapter), tokenizer, None
    config = LoraConfig(r=hp["lora_rank"], lora_alpha=hp["lora_alpha"], lora_dropout=hp.get("lora_dropout", 0.0),
                        target_modules=target_modules(model), bias="none", task_type="CAUSAL_LM")
    return model, tokenizer, config


def count_tokens(dataset) -> int:
    """Tokens per epoch: SFT's input_ids; DPO's prompt with each of its two answers."""
    columns = dataset.column_names
    if "input_ids" in columns:
        return sum(len(ids) for ids in dataset["input_ids"])
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
    return 0


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """log P(answer | prompt) under ``model``, summed over the answer's tokens (the chat template's rendering)."""
    import torch

    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids], device=device)).logits[0, :-1].float()
    targets = torch.tensor(full_ids[1:], device=device)
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return float(token_logprobs[len(prompt_ids) - 1:].sum())


def preference_accuracy(model, tokenizer, pairs, limit: int = 256) -> float | None:
    """The share of ``pairs`` (TRL rows) whose chosen answer ``model`` finds likelier than the rejected one."""
    rows = [pairs[i] for i in range(min(limit, len(pairs)))]  # the first ``limit``, not the whole split read
    if not rows:
        return None
    was_training = model.training
    model.eval()
    try:
        wins = sum(answer_logprob(model, tokenizer, row["prompt"], row["chosen"])
                   > answer_logprob(model, tokenizer, row["prompt"], row["rejected"]) for row in rows)
    finally:
        model.train(was_training)
    return round(wins / len(rows), 4)


def save_adapter(model, path: str) -> None:
    """The trained adapter only: a DPO run that continues a fine-tune also holds its frozen reference copy."""
    names = list(getattr(model, "peft_config", {}) or {})
    model.save_pretrained(path, **({"selected_adapters": ["default"]} if len(names) > 1 else {}))


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        params = pipes.extras
        # A cancelled job is interrupted with SIGINT (as Dagster does); SIGTERM means the same here.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        train(pipes, params)


def train(pipes, params: dict) -> None:
    import torch

    cuda = torch.cuda.is_available()
    backend = choose_backend(params.get("backend", "auto"), cuda)
    hp = params["hyperparameters"]
    seed = int(params.get("seed") or 0)
    dpo = params.get("method", "supervised") == "dpo"
    # Unsloth must be imported before trl and transformers.
    loader = load_unsloth if backend == "unsloth" else load_trl
    started = time.monotonic()
    model, tokenizer, peft_config = loader(params["base_model"], hp, seed, params.get("initial_adapter"))
    pipes.log.info(f"Loaded {params['base_model']}"
                   + (" with the adapter it continues" if params.get("initial_adapter") else "")
                   + f" for {backend} {'DPO' if dpo else 'supervised'} training on {'cuda' if cuda else 'cpu'} "
                   f"in {time.monotonic() - started:.1f}s")
    if dpo and backend == "unsloth":
        import unsloth

        if hasattr(unsloth, "PatchDPOTrainer"):  # Unsloth's fast DPO path (before trl's DPOTrainer is imported)
            unsloth.PatchDPOTrainer()

    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    files = {"train": params["train_file"]}
    if params.get("eval_file"):
        files["eval"] = params["eval_file"]
    data = load_dataset("json", data_files=files)
    # Loss on the assistant's turns only when the chat template marks them; else on the whole chat.
    template = getattr(tokenizer, "chat_template", None) or ""
    assistant_only = "{% generation %}" in template or "{%- generation %}" in template
    if not assistant_only and not dpo:
        pipes.log.warning("The chat template has no {% generation %} markers: training on whole conversations")
    preference_before = None
    if dpo and "eval" in data:
        preference_before = preference_accuracy(model, tokenizer, data["eval"])
        pipes.log.info(f"held-out preference accuracy before training: {preference_before}")

    output_dir = params["output_dir"]
    batch_size = int(hp["batch_size"])
    config_class = DPOConfig if dpo else SFTConfig
    method_args = {"beta": float(hp["beta"]), "loss_type": ["sigmoid", "sft"] if hp.get("sft_weight") else
                   ["sigmoid"], "loss_weights": [1.0, float(hp["sft_weight"])] if hp.get("sft_weight") else None} \
        if dpo else {"assistant_only_loss": assistant_only}
    args = config_class(
        **method_args,
        output_dir=os.path.join(output_dir, "trainer"),
        num_train_epochs=float(hp["n_epochs"]),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=int(hp.get("gradient_accumulation_steps", 1)),
        learning_rate=float(hp["learning_rate"]),
        lr_scheduler_type=hp.get("lr_scheduler_type", "linear"),
        warmup_steps=float(hp.get("warmup_ratio", 0.0)),
        max_length=int(hp["max_length"]),
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataset_num_proc=None,
    )

    class PipesProgress(TrainerCallback):
        """Streams step, loss, learning rate and ETA; saves the adapter at each epoch's end."""

        def __init__(self):
            self.started = time.monotonic()
            self.last_log = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            elapsed = time.monotonic() - self.started
            step, total = state.global_step, state.max_steps
            eta = elapsed / step * (total - step) if step else None
            metrics = {"type": "metrics", "step": step, "total_steps": total,
                       "epoch": round(float(state.epoch or 0), 4), "loss": float(logs["loss"]),
                       "learning_rate": float(logs.get("learning_rate", 0.0)),
                       "eta_seconds": round(eta, 1) if eta is not None else None,
                       "elapsed_seconds": round(elapsed, 2)}
            pipes.report_custom_message(metrics)
            if time.monotonic() - self.last_log >= 5 or step == total:
                self.last_log = time.monotonic()
                pipes.log.info(f"step {step}/{total} loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.2e}"
                               + (f" eta {eta:.0f}s" if eta is not None else ""))

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            path = os.path.join(output_dir, "checkpoints", f"step-{state.global_step}")
            save_adapter(model, path)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            pipes.report_custom_message({"type": "checkpoint", "step": state.global_step,
                                         "epoch": round(float(state.epoch or 0), 4), "path": path,
                                         "metrics": {"train_loss": losses[-1] if losses else None}})

    trainer_class = DPOTrainer if dpo else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data["train"],
                         eval_dataset=data.get("eval"), processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[PipesProgress()])
    trained_tokens = count_tokens(trainer.train_dataset) * math.ceil(float(hp["n_epochs"]))
    output = trainer.train()
    eval_loss = None
    if trainer.eval_dataset is not None and len(trainer.eval_dataset):
        eval_loss = float(trainer.evaluate()["eval_loss"])
        pipes.log.info(f"eval loss {eval_loss:.4f} on {len(trainer.eval_dataset)} examples")

    preference_after = None
    if dpo and trainer.eval_dataset is not None:
        preference_after = preference_accuracy(trainer.model, tokenizer, data["eval"])
        pipes.log.info(f"held-out preference accuracy after training: {preference_after} "
                       f"(before: {preference_before})")

    adapter_dir = os.path.join(output_dir, "adapter")
    save_adapter(trainer.model, adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    merged_dir = None
    if "ref" in (getattr(trainer.model, "peft_config", None) or {}):
        trainer.model.delete_adapter("ref")  # the reference copy is not part of the fine-tune
    if hp.get("merge"):
        merged_dir = os.path.join(output_dir, "merged")
        if backend == "unsloth":
            trainer.model.save_pretrained_merged(merged_dir, tokenizer, save_method="merged_16bit")
        else:
            # Training ran in float32 on the CPU; the merged model is saved in 16 bits as on the GPU path.
            trainer.model.merge_and_unload().to(torch.bfloat16).save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
    write_result(output_dir, {
        "backend": backend, "device": "cuda" if cuda else "cpu",
        "adapter_dir": adapter_dir, "merged_dir": merged_dir,
        "train_loss": float(output.training_loss), "eval_loss": eval_loss, "steps": output.global_step,
        "trained_tokens": trained_tokens, "train_examples": len(trainer.train_dataset),
        "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "train_seconds": round(float(output.metrics.get("train_runtime", 0.0)), 3),
        "preference_accuracy": {"base": preference_before, "fine_tuned": preference_after} if dpo else None,
    })


def write_result(output_dir: str, result: dict) -> None:
    """Replace-on-write: a reader sees the whole result or none."""
    path = os.path.join(output_dir, RESULT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(json.dumps({"cancelled": True}), file=sys.stderr)
        sys.exit(130)
