"""Every setting is validated before anything is trained or written: MoMConfig and TrainConfig fields of the
wrong type, out of range or not finite raise a ConfigError naming the field and the value; the CLIs answer
with exit code 2 and one line (no traceback) and leave the output folder untouched."""
import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import small_config
from mom import MoMConfig
from mom import data as mdata
from mom.config import BACKENDS, BALANCE_MODES, FAMILIES, ROUTERS, ROUTINGS, ConfigError
from mom.train import TrainConfig, load_config, main

MOM_INT = ("vocab_size", "n_positions", "n_embd", "n_head", "n_bottom", "chunks", "n_attn", "n_ffn", "depth",
           "top_k", "n_top", "router_dim", "n_inner", "routing_prior_steps", "num_key_value_heads")
MOM_FLOAT = ("layer_norm_epsilon", "initializer_range", "router_temperature", "aux_loss_coef", "routing_prior",
             "routing_prior_from", "rope_theta", "capacity", "capacity_scale")
MOM_BOOL = ("anchor", "skip", "shared_slots", "renormalize", "straight_through", "straight_through_clamp",
            "weighted_qkv", "dense_routing",
            "balance_skip", "checkpoint_chunks", "routing_prior_learned", "tie_word_embeddings", "attention_bias")
MOM_CHOICE = {"router": ROUTERS, "backend": BACKENDS, "balance_loss": BALANCE_MODES, "family": FAMILIES,
              "routing": ROUTINGS}
MOM_NONE_OK = ("n_inner", "num_key_value_heads", "attention_bias", "capacity")  # None: the default (4 D, n_head,
#                                                                                 the family's, top_k / pool)


def test_every_mom_field_is_covered():
    names = {f.name for f in dataclasses.fields(MoMConfig)}
    assert names == set(MOM_INT) | set(MOM_FLOAT) | set(MOM_BOOL) | set(MOM_CHOICE)


_junk = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
_not_int = st.one_of(_junk, st.booleans(), st.floats(allow_nan=True, allow_infinity=True))
_not_finite_number = st.one_of(_junk, st.booleans(), st.sampled_from([math.inf, -math.inf, math.nan]))
_not_bool = st.one_of(_junk.filter(lambda v: v is not None), st.integers(), st.floats(allow_nan=False))


def _assert_names(e, owner, field, value):
    msg = str(e.value)
    assert f"{owner}.{field}=" in msg and repr(value)[:20] in msg, msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)  # catchable as either


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mom_config_wrong_type_or_non_finite_names_the_field(data):
    kind = data.draw(st.sampled_from(["int", "float", "bool", "choice"]))
    if kind == "int":
        field, value = data.draw(st.sampled_from(MOM_INT)), data.draw(_not_int)
    elif kind == "float":
        field, value = data.draw(st.sampled_from(MOM_FLOAT)), data.draw(_not_finite_number)
    elif kind == "bool":
        field, value = data.draw(st.sampled_from(MOM_BOOL)), data.draw(_not_bool)
    else:
        field = data.draw(st.sampled_from(sorted(MOM_CHOICE)))
        value = data.draw(st.one_of(_junk, st.integers()).filter(lambda v: v not in MOM_CHOICE[field]))
    if field in MOM_NONE_OK and value is None:
        return  # None is these fields' default
    with pytest.raises(ConfigError) as e:
        small_config(**{field: value})
    _assert_names(e, "MoMConfig", field, value)


@pytest.mark.parametrize("field,value,rule", [
    ("layer_norm_epsilon", "1e-5", "finite number"), ("layer_norm_epsilon", None, "finite number"),
    ("layer_norm_epsilon", math.inf, "finite number"), ("router_temperature", math.nan, "finite number"),
    ("aux_loss_coef", math.inf, "finite number"), ("initializer_range", -math.inf, "finite number"),
    ("initializer_range", -0.1, "> 0"), ("n_embd", None, "int"), ("n_head", "4", "int"),
    ("router", None, "one of"), ("backend", ["torch"], "one of"),
    ("capacity", math.nan, "finite number"), ("capacity", "0.5", "finite number"), ("capacity_scale", 0.0, "> 0"),
    ("routing", "expert-choice", "one of"),
])
def test_reported_mom_config_cases(field, value, rule):
    with pytest.raises(ConfigError, match=rule) as e:
        small_config(**{field: value})
    _assert_names(e, "MoMConfig", field, value)


def test_mom_config_from_dict_and_from_name_bad_input():
    with pytest.raises(ConfigError, match="expected a dict"):
        MoMConfig.from_dict(["n_embd"])
    with pytest.raises(ConfigError, match="unknown preset"):
        MoMConfig.from_name(["tiny"])


@settings(max_examples=40, deadline=None)
@given(n_head=st.integers(1, 4), per_head=st.integers(1, 6), n_attn=st.integers(1, 4), n_ffn=st.integers(1, 4),
       top_k=st.integers(1, 3), skip=st.booleans(), eps=st.floats(1e-8, 1e-2), temp=st.floats(0.05, 5.0))
def test_valid_mom_configs_round_trip(n_head, per_head, n_attn, n_ffn, top_k, skip, eps, temp):
    if top_k > min(n_attn, n_ffn) + skip:
        return
    cfg = small_config(n_head=n_head, n_embd=n_head * per_head, n_attn=n_attn, n_ffn=n_ffn, top_k=top_k, skip=skip,
                       layer_norm_epsilon=eps, router_temperature=temp, renormalize=top_k > 1)
    assert MoMConfig.from_dict(json.loads(cfg.to_json())) == cfg


# --- TrainConfig ---------------------------------------------------------------------------------------------------
TRAIN_BAD = [
    ("batch_size", 0, ">= 1"), ("batch_size", -3, ">= 1"), ("batch_size", 8.0, "int"), ("batch_size", "8", "int"),
    ("eval_interval", 0, ">= 1"), ("log_interval", 0, ">= 1"), ("ckpt_interval", -1, ">= 0"),
    ("max_steps", 0, ">= 1"), ("warmup_steps", -1, ">= 0"), ("seed", -1, ">= 0"), ("seed", 2 ** 64, "2**63"),
    ("global_batch_size", 0, ">= 1"), ("block_size", 1, ">= 2"), ("stop_after", 0, ">= 1"),
    ("eval_windows", 0, ">= 1"), ("threads", 0, ">= 1"), ("lr", 0.0, "> 0"), ("lr", math.inf, "finite"),
    ("lr", "3e-4", "finite number"), ("lr", None, "finite number"), ("min_lr_ratio", 1.5, "[0, 1]"),
    ("weight_decay", -0.1, ">= 0"), ("beta1", 1.0, "[0, 1)"), ("beta2", math.nan, "finite"), ("eps", 0, "> 0"),
    ("grad_clip", -1, ">= 0"), ("grad_clip", math.inf, "finite"), ("peak_flops", 0, "> 0"),
    ("peak_flops", math.inf, "finite"), ("device", "gpu", "one of"), ("dtype", "fp16", "one of"),
    ("distributed", "deepspeed", "one of"), ("backend", "fast", "one of"), ("vanilla", "yes", "bool"),
    ("resume", 1, "bool"), ("compile", None, "bool"), ("progress", 0, "bool"), ("model", "", "preset"),
    ("model", None, "preset"), ("model_overrides", ["n_embd"], "dict"), ("model_overrides", {1: 2}, "dict"),
    ("init_from", "", "checkpoint path"), ("data", 3, "data folder"), ("out_dir", None, "folder path"),
]


def test_every_train_field_is_covered():
    assert {f for f, _, _ in TRAIN_BAD} == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field,value,rule", TRAIN_BAD, ids=[f"{f}={v!r}" for f, v, _ in TRAIN_BAD])
def test_train_config_names_field_and_value(field, value, rule):
    with pytest.raises(ConfigError, match=rule.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")) as e:
        TrainConfig(**{field: value})
    _assert_names(e, "TrainConfig", field, value)


_TRAIN_NUM = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
_TRAIN_INT = ("batch_size", "seed", "max_steps", "warmup_steps", "eval_interval", "log_interval", "ckpt_interval")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_train_config_property(data):
    if data.draw(st.booleans()):
        field, value = data.draw(st.sampled_from(_TRAIN_NUM)), data.draw(_not_finite_number)
    else:
        field, value = data.draw(st.sampled_from(_TRAIN_INT)), data.draw(st.one_of(_not_int, st.integers(-50, -1)))
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    _assert_names(e, "TrainConfig", field, value)


def test_train_config_defaults_and_replace_validate():
    tc = TrainConfig()
    with pytest.raises(ConfigError, match="TrainConfig.batch_size=0"):
        dataclasses.replace(tc, batch_size=0)


def test_load_config_files_name_the_path(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "tiny", "lr": ')
    with pytest.raises(ValueError, match=r"bad\.json: training config is not valid JSON"):
        load_config(str(bad), {})
    typed = tmp_path / "typed.json"
    typed.write_text('{"batch_size": "8"}')
    with pytest.raises(ConfigError, match=r"typed\.json: TrainConfig\.batch_size='8': must be an int"):
        load_config(str(typed), {})
    toml = tmp_path / "c.toml"
    toml.write_text('model = "tiny"\nmax_steps = \n')
    with pytest.raises(ValueError, match=r"c\.toml: training config is not valid TOML"):
        load_config(str(toml), {})
    with pytest.raises(ConfigError, match="--set lr.x: lr is 0.001, not a dict"):
        load_config(None, {"lr": 1e-3, "lr.x": 1})


# --- CLIs: exit code 2, one line, nothing written ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


@pytest.mark.parametrize("args,expect", [
    (["--eval-interval", "0"], "TrainConfig.eval_interval=0: must be >= 1"),
    (["--log-interval", "0"], "TrainConfig.log_interval=0: must be >= 1"),
    (["--batch-size", "-2"], "TrainConfig.batch_size=-2: must be >= 1"),
    (["--global-batch-size", "0"], "TrainConfig.global_batch_size=0"),
    (["--lr", "Infinity"], "TrainConfig.lr=inf: must be a finite number"),
    (["--lr", "fast"], "TrainConfig.lr='fast': must be a finite number"),
    (["--max-steps", "10.5"], "TrainConfig.max_steps=10.5: must be an int"),
    (["--device", "gpu"], "TrainConfig.device='gpu': must be one of"),
    (["--set", "model_overrides.layer_norm_epsilon=\"1e-5\""], "MoMConfig.layer_norm_epsilon='1e-5'"),
    (["--set", "model_overrides.router_temperature=Infinity"], "MoMConfig.router_temperature=inf"),
    (["--set", "model_overrides.n_embd=null"], "MoMConfig.n_embd=None: must be an int"),
])
def test_train_cli_rejects_bad_settings(sample_data, tmp_path, capsys, args, expect):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--data", sample_data, "--out-dir", str(out), "--progress", "false", "--max-steps", "3",
              "--threads", "1"] + args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and expect in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("where", ["command line", "file"])
@pytest.mark.parametrize("key,value,expect", [
    ("vanilla", "yes", "TrainConfig.vanilla='yes': must be a bool"),
    ("max_step", 5, "(did you mean 'max_steps'?)"),
    ("model_overrides", {"n_embdd": 64}, "'n_embdd' is not a MoMConfig field (did you mean 'n_embd'?)"),
    ("model_overrides", {"n_embd": -4}, "MoMConfig.n_embd=-4: must be >= 1"),
])
def test_train_cli_says_whether_the_command_line_or_the_file_is_wrong(tmp_path, capsys, where, key, value, expect):
    """The same bad setting, given on the command line or in the config file: one line naming where it is."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"max_steps": 3, **({key: value} if where == "file" else {})}))
    if where == "file":
        args = []
    elif isinstance(value, dict):
        (k, v), = value.items()
        args = ["--set", f"{key}.{k}={json.dumps(v)}"]
    else:
        args = ["--set", f"{key}={value}"]
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg), "--out-dir", str(tmp_path / "out")] + args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err
    if where == "file":
        assert err.startswith(f"python -m mom.train: error: {cfg}: "), err
    else:
        assert err.startswith(f"python -m mom.train: error on the command line: {args[0]} {args[1]}"), err
    assert not (tmp_path / "out").exists()


def test_data_cli_rejects_bad_settings(tmp_path, capsys):
    for args, expect in ((["--val-fraction", "1.5"], "val_fraction=1.5: must be a number in (0, 1)"),
                         (["--tokenizer", "bpe:lots"], "bpe:N needs an integer N"),
                         (["--tokenizer", "bpe:70000"], "vocab_size must be in"),
                         (["--source", "folder:/nonexistent/texts"], "/nonexistent/texts does not exist")):
        with pytest.raises(SystemExit) as e:
            mdata.main(["--source", "sample", "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "c")]
                       + args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and expect in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "d").exists()
