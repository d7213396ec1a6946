import math

import pytest
import torch

from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import sampling
from shardgen.workers.engine.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    derive_seed,
    draw,
    greedy,
    min_p_filter,
    next_tokens,
    row_generator,
    top_k_filter,
    top_p_filter,
)

INF = math.inf


def probs_to_logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows).log()


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]])
    assert greedy(logits).tolist() == [1, 0]


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, -4.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[4.0, -8.0]]
    sharper = apply_temperature(logits, 0.5).softmax(-1)[0, 0]
    assert sharper > logits.softmax(-1)[0, 0]


def test_top_k_keeps_exactly_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert kept.tolist() == [[-INF, 5.0, -INF, 4.0, -INF]]
    assert torch.isfinite(top_k_filter(logits, 10)).all()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = probs_to_logits([0.1, 0.5, 0.25, 0.15])
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    assert kept == [False, True, True, False]  # 0.5 < 0.7, 0.5 + 0.25 reaches it
    assert torch.isfinite(top_p_filter(logits, 0.5))[0].tolist() == [False, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.76))[0].tolist() == [False, True, True, True]


def test_min_p_threshold_relative_to_most_likely():
    logits = probs_to_logits([0.5, 0.2, 0.05, 0.25])
    kept = torch.isfinite(min_p_filter(logits, 0.4))[0].tolist()
    assert kept == [True, True, False, True]  # threshold 0.2 keeps 0.2 itself


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_draw_follows_cumulative_intervals_and_skips_zero_probability():
    probs = torch.tensor([[0.25, 0.0, 0.75], [0.5, 0.5, 0.0]])
    assert draw(probs, torch.tensor([0.1, 0.2], dtype=torch.float64)).tolist() == [0, 0]
    assert draw(probs, torch.tensor([0.3, 0.99999], dtype=torch.float64)).tolist() == [2, 1]


def test_seeded_draws_reproducible_and_rows_independent():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)

    def run(seeds):
        return next_tokens(logits[: len(seeds)], params, [row_generator(s) for s in seeds]).tolist()

    first = [run([1, 2, 3]) for _ in range(2)]
    assert first[0] == first[1]
    alone = next_tokens(logits[1:2], params, [row_generator(2)]).tolist()
    assert alone == [first[0][1]]  # a row's token does not depend on its neighbours


def test_derive_seed_distinct_per_sample():
    seeds = {derive_seed(s, j) for s in range(20) for j in range(5)}
    assert len(seeds) == 100
    assert derive_seed(7, 1) == derive_seed(7, 1)


def test_next_tokens_greedy_applies_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert next_tokens(logits, SamplingParams(), seen=seen).tolist() == [0]
    assert next_tokens(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]


def test_next_tokens_only_draws_from_the_filtered_set():
    logits = probs_to_logits([0.4, 0.3, 0.2, 0.1]).expand(64, -1).contiguous()
    generators = [row_generator(s) for s in range(64)]
    tokens = next_tokens(logits, SamplingParams(temperature=1.0, top_k=2), generators)
    assert set(tokens.tolist()) == {0, 1}
    tokens = next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.6), generators)
    assert set(tokens.tolist()) == {0, 1}
    tokens = next_tokens(logits, SamplingParams(temperature=1.0, min_p=0.6), generators)
    assert set(tokens.tolist()) == {0, 1}


def empirical(logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    generators = [row_generator(s) for s in range(draws)]
    tokens = next_tokens(logits.expand(draws, -1).contiguous(), params, generators)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / draws


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_p=0.95),  # flat: the nucleus spills past the candidates
        SamplingParams(temperature=1.0, min_p=0.001),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.8),
    ],
)
def test_candidate_fast_path_matches_full_vocabulary_filters(monkeypatch, params):
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(1)) * 2
    reference = apply_temperature(logits, params.temperature)
    if params.top_k:
        reference = top_k_filter(reference, params.top_k)
    if params.top_p < 1:
        reference = top_p_filter(reference, params.top_p)
    if params.min_p > 0:
        reference = min_p_filter(reference, params.min_p)
    expected = reference.softmax(-1)[0].double()
    monkeypatch.setattr(sampling, "CANDIDATES", 16)
    observed = empirical(logits, params, 4000)
    assert set(observed.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (observed - expected).abs().max() < 0.03


def test_spill_rows_mixed_with_fitting_rows(monkeypatch):
    """A batch where one row's nucleus fits the candidates and another's needs the full sort draws, row by row,
    exactly the token the full-vocabulary path draws for that row alone with the same seed."""
    peaked = torch.tensor([10.0, 9.0] + [0.0] * 98)
    flat = torch.linspace(0.0, 1.0, 100)  # the 0.9 nucleus holds most of the vocabulary: it spills
    logits = torch.stack([peaked, flat])
    params = SamplingParams(temperature=1.0, top_p=0.9)
    drawn = set()
    for seed in range(40):
        monkeypatch.setattr(sampling, "CANDIDATES", 100)  # every row fits: the plain full-sort path
        alone = [next_tokens(logits[i : i + 1], params, [row_generator(seed + i)]).item() for i in range(2)]
        monkeypatch.setattr(sampling, "CANDIDATES", 4)
        mixed = next_tokens(logits, params, [row_generator(seed), row_generator(seed + 1)]).tolist()
        assert mixed == alone
        assert mixed[0] in (0, 1)
        drawn.add(mixed[1])
    assert len(drawn) > 10  # the spilled row really draws across its wide nucleus


def test_token_logprobs_are_the_log_softmax_of_the_raw_logits():
    from shardgen.workers.engine.sampling import token_logprobs

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 1.0, 5.0, -2.0]])
    chosen, top_values, top_ids = token_logprobs(logits, torch.tensor([2, 0]), top=2)
    expected = logits.log_softmax(dim=-1)
    assert chosen.tolist() == pytest.approx([expected[0, 2].item(), expected[1, 0].item()])
    assert top_ids.tolist() == [[0, 2], [2, 1]]
    assert top_values[:, 0].tolist() == pytest.approx([expected[0, 0].item(), expected[1, 2].item()])
    none_chosen, none_values, none_ids = token_logprobs(logits, torch.tensor([1, 1]), top=0)
    assert none_values.shape == none_ids.shape == (2, 0)


@pytest.mark.parametrize("value, message", [(21, "logprobs must be <= 20"), (-1, "logprobs must be >= 0"),
                                            ("five", "logprobs must be an integer")])
def test_logprobs_parameter_is_validated(value, message):
    from shardgen.schemas.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match=message):
        SamplingParams(logprobs=value)


def test_logprobs_are_refused_with_beam_search_and_survive_json():
    from shardgen.schemas.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="beam search"):
        SamplingParams(logprobs=2, num_beams=2)
    assert SamplingParams.from_json(SamplingParams(logprobs=5).to_json()).logprobs == 5
    assert SamplingParams().logprobs is None
