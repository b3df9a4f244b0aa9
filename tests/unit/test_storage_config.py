"""[storage] settings: defaults, and a bad value refused naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimnetd.config import ConfigError
from stimnetd.config.reader import Reader
from stimnetd.config.storage import read_storage


def test_max_answer_mb_defaults_and_is_read() -> None:
    assert read_storage(Reader(Path("x.toml")), {}).max_answer_mb == 1024.0
    assert read_storage(Reader(Path("x.toml")), {"max_answer_mb": 64}).max_answer_mb == 64.0


@pytest.mark.parametrize("value", [0, -1, 1e12])
def test_a_bad_max_answer_mb_names_the_setting(value: float) -> None:
    with pytest.raises(ConfigError, match=r"\[storage\]\.max_answer_mb"):
        read_storage(Reader(Path("x.toml")), {"max_answer_mb": value})
