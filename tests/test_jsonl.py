import pytest

from slp_runner.errors import BadJSONL
from slp_runner.jsonl import count_prompt_records


def write(tmp_path, text):
    p = tmp_path / "p.jsonl"
    p.write_text(text)
    return str(p)


def test_counts_records_and_skips_blank_lines(tmp_path):
    assert count_prompt_records(write(tmp_path, '{"prompt": "a"}\n\n{"prompt": "b"}\n')) == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', r"p\.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}\n\n[1, 2]\n', r"p\.jsonl:3: expected a JSON object"),
        ('{"text": "a"}\n', r"p\.jsonl:1: missing string field 'prompt'"),
        ("\n\n", "no prompt records"),
    ],
)
def test_bad_lines_are_named(tmp_path, text, match):
    with pytest.raises(BadJSONL, match=match):
        count_prompt_records(write(tmp_path, text))
