"""The method registry: names, option validation, hooks a method does not implement."""

from __future__ import annotations

import dataclasses

import pytest

from workbench.methods import METHODS, Method, build_methods, register, validate_method_config


@dataclasses.dataclass
class RateConfig:
    rate: float = 0.1  # probability in [0, 1]
    start_step: int = 0

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


@pytest.fixture
def rate_method():
    @register("test_rate")
    class Rate(Method):
        Config = RateConfig

        def state_dict(self):
            return {"rate": self.config.rate}

    yield Rate
    METHODS.pop("test_rate")


def test_valid_options_are_typed_and_defaulted(rate_method):
    assert validate_method_config("test_rate", {"rate": "0.5"}) == {"rate": 0.5, "start_step": 0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rte": 0.2}, r"\[test_rate.rte\] unknown option .*did you mean 'rate'"),
        ({"rate": "high"}, r"\[test_rate.rate\] .*'high'"),
        ({"rate": 1.5}, r"rate must be in \[0, 1\]"),
        ({"start_step": 2.5}, r"\[test_rate.start_step\]"),
    ],
)
def test_bad_options(rate_method, options, message):
    with pytest.raises(ValueError, match=message):
        validate_method_config("test_rate", options)


def test_unknown_method_lists_valid_names(rate_method):
    with pytest.raises(ValueError, match=r"unknown method 'test_rat' \(did you mean 'test_rate'\?\); valid: .*test_rate"):
        validate_method_config("test_rat", {})


def test_hooks_default_to_identity_and_are_detected(rate_method):
    (method,) = build_methods({"test_rate": {"rate": 0.3}})
    assert method.config == RateConfig(rate=0.3)
    assert method.prepare_model("m") == "m" and method.wrap_collator("c") == "c" and method.callbacks() == []
    assert rate_method.overrides("state_dict") and not rate_method.overrides("loss")
    with pytest.raises(ValueError, match="no state to restore"):
        Method().load_state_dict({"x": 1})


def test_registering_twice_or_without_dataclass_config_fails(rate_method):
    with pytest.raises(ValueError, match="already registered"):
        register("test_rate")(type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="must be a dataclass"):
        register("test_bad")(type("Bad", (Method,), {"Config": dict}))


def test_a_method_class_named_by_module_path_imports_from_the_launch_directory(tmp_path, monkeypatch):
    """`mymethods:Shout` in the directory a run is launched from, as `python -m` would find it."""
    import sys

    from workbench.methods import method_class

    (tmp_path / "shout_methods_mod.py").write_text(
        "from workbench.methods import Method\n\nclass Shout(Method):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    cls = method_class("shout_methods_mod:Shout")
    assert cls.__name__ == "Shout" and METHODS["shout_methods_mod:Shout"] is cls
    with pytest.raises(ValueError, match="cannot import method 'no_such_module_x:Shout'"):
        method_class("no_such_module_x:Shout")
    METHODS.pop("shout_methods_mod:Shout")
