"""A tiny Llama-architecture chat model built entirely on this machine.

No weights can be downloaded here, yet tests, the demo and benchmarks need a real model that both
transformers and vLLM load. This builds one: a byte-level BPE tokenizer trained on a generated chat
corpus, a ChatML chat template (with ``{% generation %}`` markers so trainers can mask prompts), and a
seeded LlamaConfig with ``head_dim=32`` (vLLM's CPU attention rejects 16), then 300 AdamW steps on the
corpus (~4 s) so it answers in the corpus' style and ends its turns with ``<|im_end|>``: greedy output is
short, deterministic and the same under transformers and vLLM. ``train_steps=0`` leaves random weights.

The same recipe builds a larger chat model (``size="bench"``, served as ``vbatch-bench-chat``): ~27M
parameters over 8 layers and a 4,096-token context, large enough that prefill costs something, so benchmarks of
long shared prompts (prefix caching, few-shot files) measure the engine's work rather than the platform's overhead.

The tiny embedding model (``create_tiny_embedding_model``) is that trained transformer without its LM head
(``LlamaModel``), laid out as a sentence-transformers model (``modules.json``: mean pooling, then L2
normalisation) so vLLM's pooling runner and the transformers fallback read the same pooling from the same
files; ``is_matryoshka`` lets requests shorten vectors with ``dimensions``.

The tiny cross-encoder (``create_tiny_cross_encoder``) is that trained transformer with a one-label score head
(``LlamaForSequenceClassification``, the layout vLLM converts for its classify task and scores pairs with). Its
head is random (seeded) but wide enough that pairs' scores spread over (0, 1) instead of all sitting at 0.5,
so two engines that tokenise a pair differently disagree visibly. Its tokenizer ends a text, and each text of
a pair, with ``<|endoftext|>``, as a BERT-style cross-encoder's separators do: the query and the document stay
apart, and the last token (the one vLLM's pooler and transformers score) is the same for every pair.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from vbatch_pipelines.models.registry import EMBED, GENERATE, SCORE, TINY_MODEL_ID

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ["the sky", "a cat", "the ocean", "my garden", "a robot", "the city", "an old book",
             "the mountain", "a river", "the market", "a violin", "the desert", "a lighthouse"]
_VERBS = ["describe", "summarize", "explain", "praise", "criticize", "imagine"]
_ADJECTIVES = ["blue", "quiet", "bright", "ancient", "curious", "gentle", "vast", "busy", "small"]


def generate_corpus(n_dialogues: int = 2000, seed: int = 0) -> list[list[dict[str, str]]]:
    """Small chat dialogues (arithmetic, descriptions, echoes) that give the tokenizer its vocabulary."""
    rng = random.Random(seed)
    dialogues = []
    for _ in range(n_dialogues):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            user, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            subject, adjective = rng.choice(_SUBJECTS), rng.choice(_ADJECTIVES)
            user = f"Please {rng.choice(_VERBS)} {subject}."
            answer = f"{subject.capitalize()} is {adjective} and {rng.choice(_ADJECTIVES)}."
        else:
            word = rng.choice(_ADJECTIVES + [s.split()[-1] for s in _SUBJECTS])
            user, answer = f"Repeat the word {word}.", f"{word}"
        dialogue = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            dialogue.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        dialogues.append(dialogue)
    return dialogues


def _render(dialogue: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in dialogue)


def build_tokenizer(corpus: list[list[dict[str, str]]], vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((_render(d) for d in corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class ModelSize:
    """The shape of a chat model this recipe builds, and how long it trains (the vocabulary is the tokenizer's)."""

    model_id: str  # the name it is served under
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # >= 32: vLLM's CPU attention rejects 16
    max_position_embeddings: int
    train_steps: int  # AdamW steps on the corpus, batches of ``batch_size`` dialogues
    batch_size: int
    learning_rate: float


# "tiny": tests, the demo and most benchmarks (seconds to build). "bench": large enough that prefill costs, with a
# context that holds few-shot prompts of ~2k tokens (a few minutes to build on 2 cores).
MODEL_SIZES = {
    "tiny": ModelSize(TINY_MODEL_ID, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, head_dim=32, max_position_embeddings=1024, train_steps=300,
                      batch_size=32, learning_rate=3e-3),
    "bench": ModelSize("vbatch-bench-chat", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, head_dim=64, max_position_embeddings=4096, train_steps=100,
                       batch_size=16, learning_rate=1e-3),
}


def model_size(size: str) -> ModelSize:
    try:
        return MODEL_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}: one of {', '.join(MODEL_SIZES)}") from None


def _trained_model(seed: int, train_steps: int | None, size: str = "tiny"):
    """The chat Llama LM of ``size`` and its tokenizer, trained on the corpus (``train_steps`` None: the size's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = model_size(size)
    corpus = generate_corpus(seed=seed)
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    steps = shape.train_steps if train_steps is None else train_steps
    if steps:
        _train_on_corpus(model, tokenizer, corpus, steps, seed, shape.batch_size, shape.learning_rate)
    return model, tokenizer


def create_tiny_model(path: str | Path, *, seed: int = 0, train_steps: int | None = None, size: str = "tiny") -> Path:
    """Build and save the chat model of ``size`` (``save_pretrained``) at ``path``; returns the path.
    ``train_steps`` None: the size's own (300 for the tiny model)."""
    from transformers import GenerationConfig

    shape = model_size(size)
    train_steps = shape.train_steps if train_steps is None else train_steps
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _trained_model(seed, train_steps, size)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "vbatch_model.json").write_text(json.dumps(
        {"recipe": "vbatch tiny chat", "size": size, **asdict(shape), "seed": seed, "train_steps": train_steps},
        indent=2))
    return path


# A sentence-transformers layout: vLLM's get_pooling_config and the transformers fallback both read it.
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def create_tiny_embedding_model(path: str | Path, *, seed: int = 0, train_steps: int = 300) -> Path:
    """Build and save the tiny embedding model at ``path``: the tiny chat model's trained transformer (no LM
    head), mean-pooled and normalised; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _trained_model(seed, train_steps)
    encoder = model.model  # LlamaModel: saved with architectures ["LlamaModel"], which vLLM pools
    encoder.config.is_matryoshka = True
    encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": encoder.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": False,
    }, indent=2))
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "vbatch_model.json").write_text(
        json.dumps({"recipe": "vbatch tiny embed", "seed": seed, "train_steps": train_steps}, indent=2)
    )
    return path


def create_tiny_cross_encoder(path: str | Path, *, seed: int = 0, train_steps: int = 300) -> Path:
    """Build and save the tiny cross-encoder at ``path``: the tiny chat model's trained transformer under a
    seeded one-label score head; returns the path."""
    import torch
    from tokenizers import processors
    from transformers import LlamaForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _trained_model(seed, train_steps)
    sep = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {sep}", pair=f"$A {sep} $B {sep}", special_tokens=[(sep, tokenizer.bos_token_id)])
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token types: a decoder has none
    config = model.config
    config.num_labels, config.tie_word_embeddings = 1, False
    scorer = LlamaForSequenceClassification(config)
    scorer.model.load_state_dict(model.model.state_dict())
    torch.manual_seed(seed)
    torch.nn.init.normal_(scorer.score.weight, std=0.3)
    scorer.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "vbatch_model.json").write_text(
        json.dumps({"recipe": "vbatch tiny cross-encoder", "seed": seed, "train_steps": train_steps}, indent=2)
    )
    return path


def _train_on_corpus(model, tokenizer, corpus, steps: int, seed: int, batch_size: int = 32,
                     learning_rate: float = 3e-3) -> None:
    """A few causal-LM steps so the model speaks the corpus' language and ends its turns."""
    import torch

    rng = random.Random(seed)
    texts = [_render(d) for d in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# The builder of each task's tiny model (``ensure_tiny_model``, ``vbatch models create-tiny``).
TINY_BUILDERS = {GENERATE: create_tiny_model, EMBED: create_tiny_embedding_model, SCORE: create_tiny_cross_encoder}


def ensure_tiny_model(path: Path, task: str = GENERATE) -> Path:
    """Build the tiny chat (embedding, cross-encoder) model at ``path`` once (a lock keeps concurrent builders
    apart)."""
    from vbatch_pipelines.paths import build_once

    return build_once(path, TINY_BUILDERS[task], "config.json")
