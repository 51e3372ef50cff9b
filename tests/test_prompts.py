"""Prompts files (pipeline/prompts.py): the file's checks name the line; a request's values are
checked once, by PromptRequest, and the error gets the line number. Local files here; the
object-store path is in tests/test_storage_generate.py."""

import json

import pytest

from spellshield.pipeline.config import MAX_SEED, ConfigError, PromptRequest
from spellshield.pipeline.prompts import PromptsError, read_prompts


def write(tmp_path, text: str) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return str(path)


def test_requests_in_order(tmp_path):
    path = write(tmp_path, '"a cat"\n\n{"prompt": "a dog", "num_images": 3}\n{"prompt": "a cow", "seeds": [7, 9]}\n')
    assert read_prompts(path) == [PromptRequest("a cat", 1), PromptRequest("a dog", 3), PromptRequest("a cow", 2, (7, 9))]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "seeds": [1, 2], "num_images": 3}', 'line 2: "seeds" holds 2 seeds for num_images=3'),
    ('{"prompt": "a", "seeds": [-1]}', f'line 2: "seeds" must be a list of integers in 0..{MAX_SEED}'),
    ('{"prompt": "a", "num_images": 0}', 'line 2: "num_images" must be a positive integer, got 0'),
])
def test_a_requests_own_check_gets_the_line_number(tmp_path, line, message):
    with pytest.raises(PromptsError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        read_prompts(write(tmp_path, f'"fine"\n{line}\n'))
    # the same check, without a file: the request itself, naming the field
    with pytest.raises(ConfigError) as direct:
        value = json.loads(line)
        seeds = value.get("seeds")
        PromptRequest(value["prompt"], value.get("num_images", len(seeds) if seeds else 1), tuple(seeds) if seeds else None)
    assert str(exc.value).endswith(f'"{direct.value.name}" {direct.value.message}')


def test_running_total_is_checked_as_lines_are_read(tmp_path):
    path = write(tmp_path, '{"prompt": "a", "num_images": 999999}\n{"prompt": "b", "num_images": 2}\n')
    with pytest.raises(PromptsError, match="line 2: 1000001 images in all so far, over the limit of 1000000"):
        read_prompts(path)
