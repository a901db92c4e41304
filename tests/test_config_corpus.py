"""The malformed-config corpus: each file's `# expect:` lines are exactly the problems reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmmiod.config import EX_CONFIG, ConfigError, load

CORPUS = Path(__file__).parent / "configs" / "bad"
EXPECT = re.compile(r"^# expect: (\d+): (.*)$")
FILES = sorted(CORPUS.glob("*.yaml"))


def expected(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        m = EXPECT.match(line)
        if m:
            message = m.group(2).replace("{dir}", str(path.parent))
            out.append(f"{path}:{m.group(1)}: {message}")
    return out


def test_corpus_is_large_enough() -> None:
    assert len(FILES) >= 30
    assert all(expected(f) for f in FILES), "every corpus file states what it expects"


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_bad_config_reports_exactly_the_expected_problems(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.exit_code == EX_CONFIG
    assert info.value.problems == expected(path)
