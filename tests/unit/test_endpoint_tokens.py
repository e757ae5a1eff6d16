"""The token estimate of the endpoints other than chat: their ``input`` or ``prompt`` is the prompt."""

from __future__ import annotations

from llm_proxy.ratelimit.tokens import PRIMING, estimate_tokens


def test_an_embedding_costs_its_input() -> None:
    assert estimate_tokens({"model": "m", "input": "x" * 400}) == PRIMING + 100
    assert estimate_tokens({"model": "m", "input": ["x" * 40, "y" * 40]}) == PRIMING + 20
    assert estimate_tokens({"model": "m", "input": [1, 2, 3]}) == PRIMING + 3
    assert estimate_tokens({"model": "m", "input": [[1, 2], [3]]}) == PRIMING + 3


def test_responses_and_completions_add_their_allowance() -> None:
    item = {"role": "user", "content": "x" * 40}
    assert estimate_tokens({"model": "m", "input": [item], "max_output_tokens": 50}) == PRIMING + 4 + 10 + 50
    assert estimate_tokens({"model": "m", "prompt": "x" * 8, "max_tokens": 5, "n": 2}) == PRIMING + 2 + 10
