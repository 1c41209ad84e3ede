"""The token file: trailing comments, errors by the file's line number, the README's example."""

from __future__ import annotations

from pathlib import Path

from service.config import parse_token_file

README = Path(__file__).resolve().parents[2] / "README.md"


def test_trailing_comments_and_hashes_inside_tokens():
    text = "alice tok-a1   # rotated in May\nbob tok#b#1\n  # carol tok-c\nalice tok-a2#not-a-comment\n"
    assert parse_token_file(text) == {"tok-a1": "alice", "tok#b#1": "bob", "tok-a2#not-a-comment": "alice"}
    assert parse_token_file("# the one token\nsecret-1  # from the vault\n") == \
        parse_token_file("secret-1\n")  # a bare token may carry a comment too


def _fenced_blocks(text: str) -> list[str]:
    """The contents of the Markdown code blocks of `text`, each line stripped (a block may sit in a list)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line.strip())
    return blocks


def test_the_readme_example_parses():
    example = next(block for block in _fenced_blocks(README.read_text()) if block.startswith("# tenant"))
    assert parse_token_file(example, "README.md") == {"0f3c9a...e1": "alice", "77d2b4...90": "alice",
                                                      "9a1e6c...4b": "bob"}
