"""sampling_gap.py's advice for GRPO from the measured sampled / greedy accuracy (the run itself on the tiny
pipeline's SFT adapter: tests/test_pipeline.py)."""

import json

import pytest

import sampling_gap


@pytest.mark.parametrize("sampled, advice", [
    ({1.0: 0.50, 0.7: 0.55}, "small gap: keep temperature 1"),
    ({1.0: 0.30, 0.7: 0.50}, "moderate gap: roll out at temperature 0.7"),
    ({1.0: 0.15, 0.7: 0.40}, "large gap"),  # the tiny SFT model's case
])
def test_recommendation_follows_the_ratio_to_greedy(sampled, advice):
    assert sampling_gap.recommendation(0.6, sampled).startswith(advice)


def test_subset_is_seeded_and_keeps_the_source_schema(tmp_path):
    source = tmp_path / "gsm8k_train.jsonl"
    source.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"s\n#### {i}"}) + "\n" for i in range(50)))
    first, again, other = (sampling_gap.write_subset(str(source), None, 10, seed, tmp_path / f"{name}.jsonl")
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"question", "answer"}
    assert first.read_text() == again.read_text() != other.read_text()
    assert [row["question"] for row in rows] != [f"q{i}" for i in range(10)]  # not the first rows in file order
