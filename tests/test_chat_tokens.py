"""Chat-formatted rows (masking checked token by token) and token-level scores that sum to
the sequence score."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from hf_ggda.attributors import (
    InfluenceConfig,
    InfluenceFunction,
    TracIn,
    TracInConfig,
    token_scores,
)
from hf_ggda.errors import ChatFormatError
from hf_ggda.tasks import GROUP_COLUMN, CausalLMTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_texts

TEMPLATE = ("{% for m in messages %}<| {{ m['role'] }} |> {{ m['content'] }} [EOS] "
            "{% endfor %}{% if add_generation_prompt %}<| assistant |> {% endif %}")


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer("causal")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _reference(tok, messages: list[dict[str, str]], first_target: int = 0
               ) -> tuple[list[int], list[int]]:
    """Tokens and labels built segment by segment (headers masked, assistant content and its
    end-of-turn token targets)."""
    ids, labels = [], []
    for j, m in enumerate(messages):
        head = _ids(tok, f"<| {m['role']} |> ")
        body = _ids(tok, f"{m['content']} [EOS] ")
        target = m["role"] == "assistant" and j >= first_target
        ids += head + body
        labels += [-100] * len(head) + (body if target else [-100] * len(body))
    return ids, labels


def _chats(n: int) -> list[list[dict[str, str]]]:
    texts = toy_texts(3 * n, seed=5)
    out = []
    for i in range(n):
        conv = [{"role": "user", "content": texts[3 * i]},
                {"role": "assistant", "content": texts[3 * i + 1]}]
        if i % 2:
            conv = [{"role": "system", "content": "the"}, *conv,
                    {"role": "user", "content": texts[3 * i + 2]},
                    {"role": "assistant", "content": texts[3 * i]}]
        out.append(conv)
    return out


def test_chat_rows_mask_every_non_assistant_token(tok):
    chats = _chats(6)
    task = CausalLMTask(tok, messages_column="messages", max_length=64)
    prepared = task.prepare(Dataset.from_dict({"messages": chats}))
    for k, conv in enumerate(chats):
        ids, labels = _reference(tok, conv)
        assert prepared["input_ids"][k] == ids
        assert prepared["labels"][k] == labels


def test_conversational_prompt_completion_trains_on_the_completion_only(tok):
    chats = _chats(4)
    prompts = [c[:-1] for c in chats]
    completions = [c[-1:] for c in chats]
    task = CausalLMTask(tok, prompt_column="prompt", response_column="completion",
                        max_length=64)
    prepared = task.prepare(Dataset.from_dict({"prompt": prompts, "completion": completions}))
    for k, conv in enumerate(chats):
        ids, labels = _reference(tok, conv, first_target=len(conv) - 1)
        assert prepared["input_ids"][k] == ids and prepared["labels"][k] == labels


def test_chat_errors_are_typed_and_name_the_fix(tok):
    plain = tiny_tokenizer("causal")
    with pytest.raises(ChatFormatError, match="no chat template"):
        CausalLMTask(plain, messages_column="messages")
    task = CausalLMTask(tok, messages_column="messages")
    no_answer = [[{"role": "user", "content": "the cat"}]]
    with pytest.raises(ChatFormatError, match="Row 0 has no assistant turn"):
        task.prepare(Dataset.from_dict({"messages": no_answer}))
    bad_role = [[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]]
    with pytest.raises(ChatFormatError, match=r"message 1 .*'role'"):
        task.prepare(Dataset.from_dict({"messages": bad_role}))
    with pytest.raises(ValueError, match="not both"):
        CausalLMTask(tok, messages_column="m", prompt_column="p", response_column="r")


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer("causal")
    model = tiny_lora("llama", tok.vocab_size, r=2).double().eval()
    texts = toy_texts(30, seed=2)
    train = Dataset.from_dict({"prompt": texts[:12], "response": texts[12:24],
                               GROUP_COLUMN: [i % 3 for i in range(12)]})
    queries = Dataset.from_dict({"prompt": texts[24:27], "response": texts[27:30]})
    return model, tok, train, queries


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method", ["tracin", "if-unit", "if-kfac"])
def test_token_scores_sum_to_the_sequence_score(lm, reduction, method):
    model, tok, train, queries = lm
    task = CausalLMTask(tok, prompt_column="prompt", response_column="response",
                        max_length=32, reduction=reduction)
    if method == "tracin":
        attr = TracIn(model, task, TracInConfig(batch_size=4))
    elif method == "if-unit":
        attr = InfluenceFunction(model, task, InfluenceConfig(normalize="unit"))
    else:
        attr = InfluenceFunction(model, task, InfluenceConfig(preconditioner="kfac",
                                                              damping=0.1))
    attr.fit(train)
    sequence = attr.score(queries).matrix
    for row in range(len(queries)):
        per_token = token_scores(attr, queries, row)
        labels = task.prepare(queries.select([row]))["labels"][0]
        n_targets = sum(1 for t in labels[1:] if t != -100)
        assert per_token.matrix.shape == (n_targets, 3)
        assert per_token.tokens[-1] == tok.eos_token
        torch.testing.assert_close(per_token.matrix.sum(0), sequence[row], rtol=1e-6,
                                   atol=1e-10)
    best = per_token.top_tokens(per_token.group_ids[0], k=2)
    assert len(best) == 2 and best[0][1] >= best[1][1]


def test_card_highlights_the_response_tokens_escaped(lm, tmp_path):
    from hf_ggda.attributors.tokens import TokenScores
    from hf_ggda.integrations.cards import write_attribution_card

    model, tok, train, queries = lm
    task = CausalLMTask(tok, prompt_column="prompt", response_column="response", max_length=32)
    attr = InfluenceFunction(model, task, InfluenceConfig())
    attr.fit(train)
    scores = attr.score(queries)
    tokens = token_scores(attr, queries, 1)
    readme = write_attribution_card(tmp_path / "card", scores, attr.train_dataset,
                                    token_scores=tokens, token_query="row 1").read_text()
    best = int(torch.argmax(tokens.matrix.sum(0)))
    assert "## Which tokens the top group pushed" in readme and "Query row 1" in readme
    assert f"`{tokens.group_ids[best]}`" in readme
    assert readme.count("<span style=") == len(tokens.tokens)
    assert (tmp_path / "card" / "token_scores.png").stat().st_size > 0
    # a token is text, never markup: a hostile token is escaped inside its span
    evil = TokenScores(matrix=tokens.matrix[:2], tokens=["<script>x</script>", "ok"],
                       positions=tokens.positions[:2], group_ids=tokens.group_ids)
    readme = write_attribution_card(tmp_path / "card2", scores, attr.train_dataset,
                                    token_scores=evil).read_text()
    assert "&lt;script&gt;x&lt;/script&gt;</span>" in readme
    assert readme.count("<script>") == readme.count("`<script>")  # only inside a code span
