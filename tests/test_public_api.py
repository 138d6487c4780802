"""The public names DESIGN.md promises, importable from the package top level."""

import inspect

import atpo_fast


def test_design_names_are_exported():
    from atpo_fast import build_step_rows, fused_linear_logprobs, generate, select_steps  # noqa: F401
    from atpo_fast import selected_logprobs, step_stats, token_stats  # noqa: F401

    assert set(atpo_fast.__all__) >= {"token_stats", "step_stats", "selected_logprobs", "fused_linear_logprobs",
                                      "build_step_rows", "select_steps", "generate"}


def test_signatures_match_the_design():
    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(atpo_fast.token_stats)[:5] == ["logits", "temperature", "targets", "seed", "backend"]
    assert params(atpo_fast.step_stats) == ["stats_or_entropy_margin", "token_mask", "prev_entropy", "relative"]
    assert params(atpo_fast.selected_logprobs)[:3] == ["logits", "targets", "temperature"]
    assert params(atpo_fast.fused_linear_logprobs)[:5] == ["hidden", "weight", "targets", "bias", "temperature"]
    assert params(atpo_fast.build_step_rows)[:5] == ["tokens", "step_map", "starts", "ends", "mask_id"]
    assert params(atpo_fast.select_steps)[:6] == ["trace", "budget", "rule", "mode", "alpha", "per"]
    assert params(atpo_fast.generate)[:9] == ["model", "prompt_ids", "gen_length", "block_length", "steps",
                                             "temperature", "remasking", "threshold", "attention_mask"]
