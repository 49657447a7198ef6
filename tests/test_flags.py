"""ctxagg.flags: one command-line flag per settings-dataclass field, typed from its annotation."""
import argparse
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from ctxagg.flags import add_dataclass_flags, dataclass_values


@dataclass
class Settings:
    batch_size: int = 8
    lr: Optional[float] = None
    augment: bool = True
    amp: bool = False
    scale: tuple[float, float] = (0.4, 1.0)
    sizes: tuple[int, ...] = (1, 2, 3)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "x"


def _parse(argv, **kw):
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Settings, **kw)
    return parser.parse_args(argv)


def test_defaults_round_trip_to_an_equal_dataclass():
    assert Settings(**dataclass_values(Settings, _parse([]))) == Settings()


def test_each_annotation_gets_its_flag_type():
    args = _parse(["--batch-size", "4", "--lr", "0.5", "--no-augment", "--amp", "--scale", "0.1", "0.9",
                   "--sizes", "5", "--model-kwargs", '{"dims": [8, 16]}', "--name", "y"])
    got = Settings(**dataclass_values(Settings, args))
    assert got == Settings(4, 0.5, False, True, (0.1, 0.9), (5,), {"dims": [8, 16]}, "y")
    assert isinstance(got.scale, tuple) and isinstance(got.sizes, tuple)
    with pytest.raises(SystemExit):  # a fixed-length tuple takes exactly its length
        _parse(["--scale", "0.1"])
    with pytest.raises(SystemExit):  # typed: not a number
        _parse(["--batch-size", "four"])


def test_skip_defaults_and_overrides():
    args = _parse([], skip=("name",), defaults=dict(batch_size=2))
    assert not hasattr(args, "name") and args.batch_size == 2
    assert dataclass_values(Settings, args, lr=0.1)["lr"] == 0.1
