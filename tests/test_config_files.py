"""One loader for config files, dotted overrides, and old workdirs' configs."""

import json

import pytest

from semdiff import config_files


def test_overrides_convert_strings_to_the_field_type():
  config = config_files.load(variant="tiny", overrides={
      "train.num_steps": "7", "noise.frontier_prob": "0.25", "scorer.word_level": "false"})
  assert config.variant == "tiny"
  assert config.train.num_steps == 7
  assert config.noise.frontier_prob == 0.25
  assert config.scorer.word_level is False


def test_unknown_field_is_one_clear_error():
  with pytest.raises(ValueError, match="no field 'model.nope'"):
    config_files.load(overrides={"model.nope": 1})


def test_missing_file_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config file"):
    config_files.load(str(tmp_path / "absent.py"))


def test_an_old_saved_config_gets_the_new_fields_defaults():
  saved = json.loads(config_files.load(variant="tiny").to_json_best_effort())
  del saved["train"]["grad_accum_steps"]  # a field added after the run was saved
  saved["train"]["num_steps"] = 123
  config = config_files.with_defaults(saved)
  assert config.train.grad_accum_steps == 1
  assert config.train.num_steps == 123
  assert config.model.d_model == 64  # the tiny variant's, not the default's


def test_an_old_saved_config_keeps_the_values_it_ran_with():
  """Fields added with a new default (closed gaps) take the value an older run had."""
  saved = json.loads(config_files.load(variant="tiny").to_json_best_effort())
  assert saved["model"]["gap_state"] is True and saved["noise"]["closed_prob"] > 0
  assert config_files.with_defaults(saved).model.gap_state is True
  del saved["model"]["gap_state"], saved["noise"]["closed_prob"]
  config = config_files.with_defaults(saved)
  assert config.model.gap_state is False and config.noise.closed_prob == 0.0


def test_command_line_overrides_parse_or_say_what_is_wrong():
  assert config_files.parse_overrides(["model.num_layers=1", "optim.learning_rate=5e-3"]) == {
      "model.num_layers": "1", "optim.learning_rate": "5e-3"}
  with pytest.raises(ValueError, match=r"--set_all='model.num_layers' must look like"):
    config_files.parse_overrides(["model.num_layers"], flag="--set_all")
  with pytest.raises(ValueError, match="must look like sampler.FIELD=VALUE"):
    config_files.parse_overrides(["model.num_layers=1"], groups=("sampler",))


@pytest.mark.parametrize("key,value,match", [
    ("train.num_steps", "1.5", "expected int, like"),
    ("scorer.word_level", "maybe", "expected true or false"),
])
def test_a_value_of_the_wrong_type_is_one_clear_error(key, value, match):
  with pytest.raises(ValueError, match=f"{key}='{value}': {match}"):
    config_files.load(variant="tiny", overrides={key: value})
