"""vbatch vs `vllm run-batch` on realistic batch files: shared system prompts, few-shot prefixes, mixed lengths.

bench_vs_run_batch.py sends 5,000 copies of one tiny question; real batch files are not like that. This builds
three `/v1/chat/completions` files (temperature 0, in the style of the corpus the local models were trained on, so
their answers are sensible and end their turns) and runs each through both sides, on the same model, the same
engine flags and prefix caching on for both:

a) ``--requests`` lines sharing one system prompt of ~400 tokens (the model's own tokenizer's) with short, varied,
   distinct user turns.
b) ``--requests`` lines with 1- to 8-shot prefixes (user/assistant example pairs before the real question) from 4
   templates, each a task instruction and a fixed list of examples (a k-shot prefix begins the (k+1)-shot one, as a
   prompt builder's does). Up to ~2k-token prompts on the bench model, sized to fit the tiny model's context.
c) ``--requests`` lines of mixed lengths: prompts from one question to a long conversation, ``max_tokens``
   log-uniform over 8..512, and 10 % of the lines repeating an earlier line's body exactly (own custom_id).

vbatch is driven as a user drives it (benchmarks/stack.py): a real `vbatch up` on a fresh home serving the model
(VBATCH_MODELS, its engine warmed at start), the openai SDK uploading the file, then create -> completed on the warm
engine (the upload before it is not counted). run-batch gets the managed server's engine flags
(``ManagedVLLMServer.engine_args``, printed) plus ``--enable-prefix-caching``; its processing time runs from its
"Reading batch from" log line (engine loaded) to its output file's write (its start-up is not held against it).
vbatch's engine passes no prefix-caching flag: vLLM turns it on by default for this model, and the script checks
the engine's own config line says so (it stops otherwise). The vbatch engine's prefix-cache hit rate on each file
is printed from its /metrics.

Each file runs ``--trials`` times, the sides alternating (each first in turn); the medians are compared, with the
spread of the per-trial ratios. Targets: with ``--model bench`` (~27M parameters, where prefill costs),
vbatch >= 1.3x run-batch on (a) and (b), >= 1.15x on (c); with the tiny model >= 1.15x on (a).

``--model bench`` builds the model once (the tiny-model recipe's bench size, a few minutes on 2 cores) into a
cache directory keyed by the recipe's source and the library versions.

Usage: python benchmarks/bench_realistic.py [--model tiny|bench] [--files a,b,c] [--requests 5000] [--trials 5]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import sys
import tempfile
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stack import Stack, alternate, load_average, prefix_cache_counts, run_batch  # noqa: E402
from vbatch_pipelines.models.tiny import _ADJECTIVES, _SUBJECTS, _VERBS, MODEL_SIZES, create_tiny_model  # noqa: E402
from vbatch_pipelines.paths import build_once  # noqa: E402

TARGETS = {"bench": {"a": 1.3, "b": 1.3, "c": 1.15}, "tiny": {"a": 1.15}}
SYSTEM_TOKENS = 400  # file (a)'s shared system prompt
SHORT_MAX_TOKENS = 64  # files (a) and (b): the answers are a sentence
MIXED_MAX_TOKENS = (8, 512)  # file (c): log-uniform
DUPLICATE_SHARE = 0.1  # file (c): lines whose body repeats an earlier line's
TEMPLATES = 4  # file (b)
MAX_SHOTS = 8
_WORDS = _ADJECTIVES + [s.split()[-1] for s in _SUBJECTS]


def cached_model(size: str) -> Path:
    """The chat model of ``size``, built once per recipe and library versions (the build is deterministic)."""
    from importlib.metadata import version

    import vbatch_pipelines.models.tiny as recipe

    key = hashlib.sha256(Path(recipe.__file__).read_bytes())
    key.update(f"{version('torch')} {version('transformers')} {version('tokenizers')}".encode())
    path = Path(tempfile.gettempdir()) / "vbatch-bench-models" / key.hexdigest()[:16] / MODEL_SIZES[size].model_id
    return build_once(path, functools.partial(create_tiny_model, size=size), "config.json")


class Prompts:
    """Corpus-style text measured in the model's own tokens."""

    def __init__(self, model_path: Path, seed: int = 0):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.context = json.loads((model_path / "config.json").read_text())["max_position_embeddings"]
        self.rng = random.Random(seed)

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def sentence(self) -> str:
        return f"{self.rng.choice(_SUBJECTS).capitalize()} is {self.rng.choice(_ADJECTIVES)} and " \
               f"{self.rng.choice(_ADJECTIVES)}."

    def text_of(self, tokens: int, opening: str = "") -> str:
        """``opening`` then corpus sentences up to ``tokens`` tokens."""
        text = opening
        while self.tokens(text) < tokens:
            text = f"{text} {self.sentence()}".strip()
        return text

    def question(self) -> tuple[str, str]:
        """A user turn of the corpus' three kinds, varied enough that 5,000 of them are mostly distinct, and the
        answer the corpus gives it."""
        kind = self.rng.randrange(3)
        if kind == 0:
            a, b = self.rng.randrange(100), self.rng.randrange(100)
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        if kind == 1:
            subject, adjective = self.rng.choice(_SUBJECTS), self.rng.choice(_ADJECTIVES)
            other = self.rng.choice(_ADJECTIVES)
            return (f"Please {self.rng.choice(_VERBS)} {subject}, the {adjective} one.",
                    f"{subject.capitalize()} is {adjective} and {other}.")
        first, second = self.rng.choice(_WORDS), self.rng.choice(_WORDS)
        return f"Repeat the words {first} and {second}.", f"{first} {second}"

    def distinct_questions(self, n: int) -> list[str]:
        seen: dict[str, None] = {}
        while len(seen) < n:
            seen.setdefault(self.question()[0])
        return list(seen)


def line(custom_id: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": messages}}


def write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def shared_system_file(prompts: Prompts, path: Path, n: int, model: str) -> tuple[Path, str]:
    """(a): one ~400-token system prompt, ``n`` distinct short user turns."""
    system = prompts.text_of(SYSTEM_TOKENS, "You are a helpful assistant. Answer in one short sentence.")
    lines = [line(f"a-{i}", model, [{"role": "system", "content": system}, {"role": "user", "content": q}],
                  SHORT_MAX_TOKENS) for i, q in enumerate(prompts.distinct_questions(n))]
    return write(path, lines), f"system prompt {prompts.tokens(system)} tokens, {n} distinct user turns"


def few_shot_file(prompts: Prompts, path: Path, n: int, model: str) -> tuple[Path, str]:
    """(b): 1- to 8-shot prefixes from ``TEMPLATES`` templates (instruction + fixed examples), then the question.
    The 8-shot prompt is ~2k tokens, or what leaves room for the answer in a smaller context."""
    budget = min(2048, prompts.context - 2 * SHORT_MAX_TOKENS)
    templates = []
    for t in range(TEMPLATES):
        system = prompts.text_of(budget // 8, f"Task {t + 1}: answer as the examples do.")
        shots = []
        for _ in range(MAX_SHOTS):  # each example a few questions in one turn, answered in one
            asked, answered = [], []
            while prompts.tokens(" ".join(asked + answered)) < (budget * 7 // 8) // MAX_SHOTS - 16:
                question, answer = prompts.question()
                asked.append(question)
                answered.append(answer)
            shots += [{"role": "user", "content": " ".join(asked)}, {"role": "assistant", "content": " ".join(answered)}]
        templates.append([{"role": "system", "content": system}, *shots])
    lines = []
    for i, question in enumerate(prompts.distinct_questions(n)):
        template, shots = prompts.rng.randrange(TEMPLATES), prompts.rng.randint(1, MAX_SHOTS)
        messages = [*templates[template][:1 + 2 * shots], {"role": "user", "content": question}]
        lines.append(line(f"b-{i}", model, messages, SHORT_MAX_TOKENS))
    longest = max(prompts.prompt_tokens([*template, {"role": "user", "content": "What is 99 plus 99?"}])
                  for template in templates)
    assert longest + SHORT_MAX_TOKENS <= prompts.context, (longest, prompts.context)
    return write(path, lines), f"{TEMPLATES} templates, 1-{MAX_SHOTS} shots, longest prompt {longest} tokens"


def mixed_file(prompts: Prompts, path: Path, n: int, model: str) -> tuple[Path, str]:
    """(c): prompts from one question to a long conversation, ``max_tokens`` log-uniform over 8..512, 10 % of the
    bodies repeating an earlier line's."""
    low, high = MIXED_MAX_TOKENS
    systems = [prompts.text_of(tokens, "You are a helpful assistant.") for tokens in (20, 100, 300)]
    duplicates = set(prompts.rng.sample(range(1, n), int(DUPLICATE_SHARE * n))) if n > 1 else set()
    lines, prompt_lengths = [], []
    for i in range(n):
        if i in duplicates:
            lines.append({**prompts.rng.choice(lines), "custom_id": f"c-{i}"})
            continue
        max_tokens = int(round(math.exp(prompts.rng.uniform(math.log(low), math.log(high)))))
        room = min(prompts.context - max_tokens - 16, 2048)
        turns = int(math.exp(prompts.rng.uniform(0, math.log(40))))  # earlier exchanges: 1 to 40, log-uniform
        messages = [{"role": "system", "content": prompts.rng.choice(systems)}] if prompts.rng.random() < 0.5 else []
        for _ in range(turns - 1):
            question, answer = prompts.question()
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": prompts.question()[0]})
        while prompts.prompt_tokens(messages) > room:  # drop the oldest exchange until it fits
            start = 1 if messages[0]["role"] == "system" else 0
            del messages[start:start + 2]
        prompt_lengths.append(prompts.prompt_tokens(messages))
        lines.append(line(f"c-{i}", model, messages, max_tokens))
    lengths = sorted(prompt_lengths)
    return write(path, lines), (f"prompts {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
                                f"max_tokens {low}-{high} log-uniform, {len(duplicates)} duplicate bodies")


FILES = {"a": ("shared ~400-token system prompt", shared_system_file),
         "b": ("1-8-shot prefixes", few_shot_file),
         "c": ("mixed lengths, 10% duplicates", mixed_file)}


def checked_run_batch(python: str, model_path: str, source: Path, out: Path, engine_args: list[str],
                      served_model: str, cache: list) -> float:
    """run-batch's processing seconds; every line answered without an error (a refused line still writes one).
    Its prefix cache's (hits, queries) is appended to ``cache``."""
    _, processing = run_batch(python, model_path, source, out, engine_args, served_model, cache)
    failed = [x for x in map(json.loads, out.read_text().splitlines())
              if x.get("error") or (x.get("response") or {}).get("status_code") != 200]
    if failed:
        raise RuntimeError(f"run-batch failed {len(failed)} lines of {source.name}, e.g. {failed[0]}")
    return processing


def engine_state(stack: Stack, model: str) -> dict:
    return json.loads((stack.home / "engines" / f"{model}.json").read_text())


def prefix_caching_on(stack: Stack, model: str) -> bool:
    """What vbatch's engine says in its config line (vLLM logs ``enable_prefix_caching=...`` at start)."""
    log = (stack.home / "engines" / f"{model}.log").read_text(errors="replace")
    return "enable_prefix_caching=True" in log and "enable_prefix_caching=False" not in log


def engine_cache_counts(stack: Stack, model: str) -> tuple[float, float]:
    """(hits, queries) in prompt tokens so far, from vbatch's engine's /metrics."""
    return prefix_cache_counts(f"http://127.0.0.1:{engine_state(stack, model)['port']}/metrics")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODEL_SIZES), default="bench")
    parser.add_argument("--files", default="a,b,c", help="which files, comma-separated: a, b, c")
    parser.add_argument("--requests", type=int, default=5000, help="lines per file")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    unknown = sorted(set(files) - set(FILES))
    if unknown or not files:
        parser.error(f"--files: {', '.join(unknown) or 'none given'}; choose from {', '.join(FILES)}")
    if args.requests < 1 or args.trials < 1:
        parser.error("--requests and --trials must be at least 1")

    model_id = MODEL_SIZES[args.model].model_id
    model_path = cached_model(args.model)
    print(f"load average {load_average()}; model {model_id} at {model_path}", flush=True)
    stack = Stack(env={"VBATCH_MODELS": f"{model_id}={model_path}"})  # its engine warms at start
    try:
        model, engine_args, python = stack.engine(model_id)
        if not prefix_caching_on(stack, model_id):
            raise SystemExit(f"vbatch's engine runs without prefix caching (see {stack.home}/engines/{model_id}.log): "
                             "the comparison would not be like for like")
        rb_args = [*engine_args, "--enable-prefix-caching"]
        print(f"vbatch's engine flags: {' '.join(engine_args)} (prefix caching on: vLLM's default, its config line)")
        print(f"run-batch's flags:     {' '.join(rb_args)}", flush=True)
        work = stack.home / "bench"
        work.mkdir()
        stack.timed(write(work / "warm.jsonl", [line(f"w-{i}", model_id, [{"role": "user", "content": "Hi"}], 8)
                                                for i in range(20)]))
        prompts = Prompts(model_path)
        results = {}
        for name in files:
            title, build = FILES[name]
            source, shape = build(prompts, work / f"{name}.jsonl", args.requests, model_id)
            print(f"\n({name}) {title}: {args.requests} lines; {shape}", flush=True)
            vb, rb, hit_rates, rb_cache = [], [], [], []

            def vbatch_side(source=source, vb=vb, hit_rates=hit_rates) -> None:
                hits, queries = engine_cache_counts(stack, model_id)
                vb.append(stack.timed(source)[0])
                new_hits, new_queries = engine_cache_counts(stack, model_id)
                hit_rates.append((new_hits - hits) / max(new_queries - queries, 1))

            def run_batch_side(source=source, rb=rb, name=name, rb_cache=rb_cache) -> None:
                rb.append(checked_run_batch(python, model.path, source, work / f"{name}.out", rb_args, model_id,
                                            rb_cache))

            for trial in alternate(args.trials, [vbatch_side, run_batch_side]):
                rb_hits, rb_queries = rb_cache[-1]
                print(f"   trial {trial + 1}: vbatch {vb[-1]:.2f}s (prefix-cache hits {hit_rates[-1]:.0%} of prompt "
                      f"tokens), run-batch {rb[-1]:.2f}s ({rb_hits / max(rb_queries, 1):.0%}), "
                      f"ratio {rb[-1] / vb[-1]:.2f}x", flush=True)
            results[name] = (median(vb), median(rb), [r / v for r, v in zip(rb, vb)])

        print(f"\n{model_id}, {args.requests} lines a file, medians of {args.trials} alternating trials "
              f"(load average {load_average()})")
        print(f"{'file':<36} {'vbatch s':>9} {'run-batch s':>12} {'speed-up':>9} {'trial ratios':>15}  target")
        for name, (vb_median, rb_median, ratios) in results.items():
            target = TARGETS[args.model].get(name)
            verdict = "-" if target is None else f">= {target}x {'met' if rb_median / vb_median >= target else 'MISSED'}"
            print(f"({name}) {FILES[name][0]:<32} {vb_median:>9.2f} {rb_median:>12.2f} {rb_median / vb_median:>8.2f}x "
                  f"{min(ratios):>7.2f}-{max(ratios):.2f}x  {verdict}")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
