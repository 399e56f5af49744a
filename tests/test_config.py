"""Job files: every key has its default, and every mistake names file, line (or override), key and what is allowed."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

from torchactors.errors import ConfigError
from torchactors.jobs.config import JOB_KEYS, ROLE_KEYS, RUNTIME_KEYS, STOP_KEYS, load_config

REPO = Path(__file__).resolve().parents[1]

JOBMOD = textwrap.dedent('''
    import torchactors as ta

    @ta.actor(max_restarts=2)
    class Decorated:
        def __init__(self, size):
            self.size = size

    class Rollout:
        def __init__(self, num_envs=8, replica_index=None):
            self.num_envs = num_envs

    class Learner:
        def __init__(self, lr, hidden=64):
            self.lr = lr

    class Anything:
        def __init__(self, **kwargs):
            pass

    def helper():
        pass

    def main(job):
        pass

    def tuned(job, rounds=1, *, label="x"):
        pass

    def no_args():
        pass

    NOT_CALLABLE = 3
''')

GOOD = textwrap.dedent('''\
    job:
      name: demo
      seed: 3
    runtime:
      num_threads: 2
      store_capacity: 512MiB
    roles:
      rollout:
        class: cfgjobmod:Rollout
        replicas: 2
        args:
          num_envs: 4
      learner:
        class: cfgjobmod:Learner
        args: {lr: 0.01}
        env: {OMP_WAIT_POLICY: PASSIVE}
    program: cfgjobmod:main
    stop:
      max_frames: 1000
''')
# Line numbers in GOOD, for the assertions below.
L_ROLLOUT, L_REPLICAS, L_ARGS_ROLLOUT, L_LEARNER, L_PROGRAM, L_STOP = 8, 10, 11, 13, 17, 18


@pytest.fixture(scope="module", autouse=True)
def jobmod(tmp_path_factory: pytest.TempPathFactory):
    """A module the job files name (cfgjobmod), importable for this file's tests."""
    d = tmp_path_factory.mktemp("cfgjobmod")
    (d / "cfgjobmod.py").write_text(JOBMOD)
    sys.path.insert(0, str(d))
    yield
    sys.path.remove(str(d))
    sys.modules.pop("cfgjobmod", None)


@pytest.fixture
def job_file(tmp_path: Path):
    """Write YAML text to tmp/job.yaml and return its path (as a string, as a user types it)."""
    def write(text: str, name: str = "job.yaml") -> str:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return str(p)
    return write


def expect_error(path: str, overrides=(), *, line, key=None, contains=(), allowed=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    err = info.value
    msg = str(err)
    assert msg.startswith(path), msg
    assert err.file == path
    if line is None:
        assert err.line is None
        assert "override '" in msg, msg
    else:
        assert msg.startswith(f"{path}:{line}: "), msg
        assert err.line == line
    if key is not None:
        assert err.key == key, (err.key, msg)
    for part in contains:
        assert part in msg, msg
    assert "; allowed: " in msg, msg
    if allowed is not None:
        assert msg.endswith(f"; allowed: {allowed}"), msg
    return err


# --------------------------------------------------------------------------- good files


def test_minimal_job_gets_every_default(job_file):
    cfg = load_config(job_file("""\
        job: {name: tiny}
        roles:
          w: {class: cfgjobmod:Anything}
        program: cfgjobmod:main
    """))
    assert cfg.to_dict() == {
        "job": {"name": "tiny", "seed": 0},
        "runtime": {"backend": "local", "address": None, "num_threads": None, "store_capacity": None,
                    "start_method": "zygote"},
        "roles": {"w": {"class": "cfgjobmod:Anything", "replicas": 1, "args": {}, "num_threads": None,
                        "device": "cpu", "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 1,
                        "env": {}, "ray_options": {}, "start_timeout": 120.0, "start_method": None,
                        "restart_backoff": None}},
        "program": "cfgjobmod:main",
        "program_args": {},
        "stop": {"max_frames": None, "max_seconds": None, "target_return": None},
    }
    assert cfg.num_processes == 1


def test_full_job_loads_as_written(job_file):
    cfg = load_config(job_file(GOOD))
    assert cfg.job.name == "demo" and cfg.job.seed == 3
    assert cfg.runtime.num_threads == 2 and cfg.runtime.store_capacity == "512MiB"
    assert list(cfg.roles) == ["rollout", "learner"]
    assert cfg.roles["rollout"].replicas == 2 and cfg.roles["rollout"].args == {"num_envs": 4}
    assert cfg.roles["learner"].class_path == "cfgjobmod:Learner"
    assert cfg.roles["learner"].env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cfg.stop.max_frames == 1000
    assert cfg.num_processes == 3


def test_config_dict_is_plain_and_a_copy(job_file):
    cfg = load_config(job_file(GOOD))
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    d["roles"]["rollout"]["args"]["num_envs"] = 99
    assert cfg.roles["rollout"].args == {"num_envs": 4}


def test_anchors_and_merge_keys_share_role_settings(job_file):
    cfg = load_config(job_file("""\
        job: {name: anchors}
        roles:
          a: &base
            class: cfgjobmod:Rollout
            args: {num_envs: 2}
          b:
            <<: *base
            replicas: 3
        program: cfgjobmod:main
    """))
    assert cfg.roles["b"].class_path == "cfgjobmod:Rollout"
    assert cfg.roles["b"].replicas == 3 and cfg.roles["b"].args == {"num_envs": 2}
    assert cfg.num_processes == 4


def test_empty_optional_sections_mean_defaults(job_file):
    cfg = load_config(job_file("""\
        job: {name: x}
        runtime:
        roles: {w: {class: cfgjobmod:Anything}}
        program: cfgjobmod:main
        stop:
    """))
    assert cfg.runtime.backend == "local" and cfg.stop.max_seconds is None


def test_numbers_are_normalised(job_file):
    cfg = load_config(job_file(GOOD), ["stop.max_seconds=30", "stop.target_return=195"])
    assert cfg.stop.max_seconds == 30.0 and isinstance(cfg.stop.max_seconds, float)
    assert cfg.stop.target_return == 195.0 and isinstance(cfg.stop.target_return, float)


def test_ray_backend_takes_an_address(job_file):
    cfg = load_config(job_file(GOOD), ["backend=ray", "address=ray://head:10001"])
    assert cfg.runtime.backend == "ray" and cfg.runtime.address == "ray://head:10001"


@pytest.mark.parametrize("size", [4096, "4GiB", "512MiB", "1.5GB", "64 KiB"])
def test_store_capacity_takes_what_init_takes(job_file, size):
    assert load_config(job_file(GOOD), [f"runtime.store_capacity={size}"]).runtime.store_capacity == size


@pytest.mark.parametrize("size", ["GiB", "4 lightyears", "-1", 0, -5, "0MiB", "true", "[1]"])
def test_store_capacity_must_be_a_positive_size(job_file, size):
    expect_error(job_file(GOOD), [f"runtime.store_capacity={size}"], line=None, key="runtime.store_capacity",
                 contains=["4GiB"])


# --------------------------------------------------------------------------- mistakes in the file

ROLE_ALLOWED = ("args, class, device, env, max_concurrency, max_restarts, max_task_retries, num_threads, "
                "ray_options, replicas, restart_backoff, start_method, start_timeout")


def test_unknown_role_key_names_line_key_and_allowed_keys(job_file):
    path = job_file(GOOD.replace("replicas: 2", "replica: 2"))
    expect_error(path, line=L_REPLICAS, key="roles.rollout.replica",
                 contains=["unknown key 'replica' in roles.rollout"], allowed=ROLE_ALLOWED)


@pytest.mark.parametrize("old,new,line,key,contains", [
    ("job:\n", "jobs: {}\njob:\n", 1, "jobs",
     ["unknown key 'jobs' at the top level", "job, program, program_args, roles, runtime, stop"]),
    ("  seed: 3", "  seed: 3\n  sead: 4", 4, "job.sead", ["unknown key 'sead' in job", "name, seed"]),
    ("  num_threads: 2\n  store", "  num_thread: 2\n  store", 5, "runtime.num_thread",
     ["address, backend, num_threads, start_method, store_capacity"]),
    ("  max_frames: 1000", "  max_frame: 1000", 19, "stop.max_frame", ["max_frames, max_seconds, target_return"]),
])
def test_unknown_keys_in_every_section(job_file, old, new, line, key, contains):
    assert old in GOOD
    expect_error(job_file(GOOD.replace(old, new, 1)), line=line, key=key, contains=contains)


@pytest.mark.parametrize("old,new,line,key,contains", [
    ("  name: demo\n", "", 1, "job", ["missing required key 'name' in job"]),
    ("program: cfgjobmod:main\n", "", 1, None, ["missing required key 'program' at the top level"]),
    ("    class: cfgjobmod:Rollout\n", "", L_ROLLOUT, "roles.rollout", ["missing required key 'class' in roles.rollout",
                                                                          "'module:Class'"]),
])
def test_missing_required_keys(job_file, old, new, line, key, contains):
    assert old in GOOD
    expect_error(job_file(GOOD.replace(old, new)), line=line, key=key, contains=contains)


def test_missing_roles_and_job(job_file):
    expect_error(job_file("program: cfgjobmod:main\nroles: {w: {class: cfgjobmod:Anything}}\n"), line=1,
                 contains=["missing required key 'job'"])
    expect_error(job_file("job: {name: x}\nprogram: cfgjobmod:main\n"), line=1,
                 contains=["missing required key 'roles'"])


# (key as written in GOOD or added, bad value, expected dotted key, words in the allowed part)
BAD_VALUES = [
    ("replicas: 2", "replicas: abc", "roles.rollout.replicas", "int >= 1"),
    ("replicas: 2", "replicas: 0", "roles.rollout.replicas", "int >= 1"),
    ("replicas: 2", "replicas: true", "roles.rollout.replicas", "int >= 1"),
    ("replicas: 2", "replicas: 2.5", "roles.rollout.replicas", "int >= 1"),
    ("replicas: 2", "num_threads: 0", "roles.rollout.num_threads", "int >= 1"),
    ("replicas: 2", "device: gpu", "roles.rollout.device", "cpu, cuda, cuda:N"),
    ("replicas: 2", "device: 'cuda:x'", "roles.rollout.device", "cpu, cuda, cuda:N"),
    ("replicas: 2", "max_restarts: -2", "roles.rollout.max_restarts", "int >= 0"),
    ("replicas: 2", "max_task_retries: -2", "roles.rollout.max_task_retries", "int >= 0"),
    ("replicas: 2", "max_concurrency: 0", "roles.rollout.max_concurrency", "int >= 1"),
    ("replicas: 2", "env: [A, B]", "roles.rollout.env", "environment variable"),
    ("replicas: 2", "env: {A: 1}", "roles.rollout.env", "environment variable"),
    ("replicas: 2", "env: {'A B': x}", "roles.rollout.env", "environment variable"),
    ("args:\n      num_envs: 4", "args: [1, 2]", "roles.rollout.args", "keyword arguments"),
    ("seed: 3", "seed: 1.5", "job.seed", "int"),
    ("name: demo", "name: 'my job'", "job.name", "letters, digits"),
    ("name: demo", "name: 7", "job.name", "letters, digits"),
    ("num_threads: 2", "backend: slurm", "runtime.backend", "local, ray"),
    ("num_threads: 2", "num_threads: -2", "runtime.num_threads", "int >= 1"),
    ("store_capacity: 512MiB", "store_capacity: 4 lightyears", "runtime.store_capacity", "4GiB"),
    ("store_capacity: 512MiB", "store_capacity: -1", "runtime.store_capacity", "4GiB"),
    ("store_capacity: 512MiB", "start_method: threads", "runtime.start_method", "zygote, spawn"),
    ("max_frames: 1000", "max_frames: 1.5", "stop.max_frames", "int >= 1"),
    ("max_frames: 1000", "max_seconds: 0", "stop.max_seconds", "number > 0"),
    ("max_frames: 1000", "max_seconds: soon", "stop.max_seconds", "number > 0"),
    ("max_frames: 1000", "max_seconds: .nan", "stop.max_seconds", "number > 0"),
    ("max_frames: 1000", "target_return: high", "stop.target_return", "number"),
]


@pytest.mark.parametrize("old,new,key,allowed", BAD_VALUES)
def test_bad_values_name_line_key_and_allowed(job_file, old, new, key, allowed):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == new)
    err = expect_error(job_file(text), line=line, key=key, contains=[key, allowed])
    assert allowed in str(err.allowed)


ROLE_ONLY_KEYS = {"class", "replicas", "args", "start_timeout"}


def test_role_keys_are_the_actor_options_a_job_file_may_set():
    """One schema (torchactors/actors/options.py): a role's keys beyond its own are actor options."""
    from torchactors.actors.options import OPTIONS

    assert set(ROLE_KEYS) - ROLE_ONLY_KEYS == {name for name, o in OPTIONS.items() if o.in_job_file}


@pytest.mark.parametrize("option,value", [("num_threads", 0), ("max_restarts", -2), ("device", "gpu"),
                                          ("env", {"A": 1}), ("max_concurrency", True)])
def test_a_bad_option_gives_the_same_reason_in_python_and_in_a_job_file(job_file, option, value):
    import torchactors as ta

    with pytest.raises(ValueError) as python_error:
        ta.actor(**{option: value})
    text = GOOD.replace("replicas: 2", f"{option}: {json.dumps(value)}", 1)
    err = expect_error(job_file(text), line=L_REPLICAS, key=f"roles.rollout.{option}",
                       contains=[str(python_error.value)])
    assert f"roles.rollout.{option}: " in str(err)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_fork_start_methods_are_refused_with_the_reason(job_file, method):
    text = GOOD.replace("  num_threads: 2", f"  start_method: {method}")
    err = expect_error(job_file(text), line=5, key="runtime.start_method", allowed="zygote, spawn")
    assert "CUDA" in str(err) and "thread" in str(err)


def test_address_needs_the_ray_backend(job_file):
    text = GOOD.replace("  num_threads: 2", "  address: auto")
    expect_error(job_file(text), line=5, key="runtime.address", contains=["backend: ray"])


@pytest.mark.parametrize("roles,line,contains", [
    ("roles: {}\n", 7, "non-empty mapping"),
    ("roles: [a, b]\n", 7, "non-empty mapping"),
    ("roles:\n", 7, "non-empty mapping"),
    ("roles:\n  w: cfgjobmod:Anything\n", 8, "roles.w must be a mapping"),
    ("roles:\n  'my role': {class: cfgjobmod:Anything}\n", 8, "role name 'my role'"),
])
def test_bad_roles(job_file, roles, line, contains):
    text = GOOD.split("roles:")[0] + roles + "program: cfgjobmod:main\n"
    expect_error(job_file(text), line=line, contains=[contains])


@pytest.mark.parametrize("ref,contains", [
    ("cfgjobmod.Rollout", "got 'cfgjobmod.Rollout'"),
    ("no_such_module_xyz:Rollout", "cannot import module 'no_such_module_xyz'"),
    ("cfgjobmod:Rolout", "has no attribute 'Rolout'"),
    ("cfgjobmod:helper", "not a class"),
    ("[1, 2]", "got [1, 2]"),
])
def test_bad_class(job_file, ref, contains):
    text = GOOD.replace("class: cfgjobmod:Rollout", f"class: {ref}")
    expect_error(job_file(text), line=9, key="roles.rollout.class", contains=[contains],
                 allowed="'module:Class', importable")


def test_class_whose_module_fails_to_import(job_file, tmp_path, monkeypatch):
    (tmp_path / "cfg_broken_mod.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = GOOD.replace("class: cfgjobmod:Rollout", "class: cfg_broken_mod:Rollout")
    expect_error(job_file(text), line=9, key="roles.rollout.class", contains=["RuntimeError: half-written module"])


@pytest.mark.parametrize("ref,contains", [
    ("cfgjobmod:nope", "has no attribute 'nope'"),
    ("cfgjobmod:NOT_CALLABLE", "not callable"),
    ("cfgjobmod:no_args", "must take one argument"),
    ("missing_mod_xyz:main", "cannot import module"),
    ("main", "got 'main'"),
])
def test_bad_program(job_file, ref, contains):
    text = GOOD.replace("program: cfgjobmod:main", f"program: {ref}")
    expect_error(job_file(text), line=L_PROGRAM, key="program", contains=[contains])


def test_backend_ray_without_ray_installed_is_refused_when_checked(job_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    text = GOOD.replace("  num_threads: 2\n", "  num_threads: 2\n  backend: ray\n", 1)
    expect_error(job_file(text), line=6, key="runtime.backend", contains=["needs Ray", "pip install"])


def test_program_args_are_checked_against_the_programs_signature(job_file):
    text = GOOD.replace("program: cfgjobmod:main", "program: cfgjobmod:tuned\nprogram_args: {rounds: 3, label: y}")
    cfg = load_config(job_file(text))
    assert cfg.program_args == {"rounds": 3, "label": "y"} and cfg.to_dict()["program_args"] == cfg.program_args
    assert load_config(job_file(text), ["program_args.rounds=5"]).program_args["rounds"] == 5
    bad = GOOD.replace("program: cfgjobmod:main", "program: cfgjobmod:tuned\nprogram_args:\n  rouns: 3")
    expect_error(job_file(bad), line=L_PROGRAM + 2, key="program_args.rouns",
                 contains=["cfgjobmod:tuned takes no argument 'rouns' (program_args)"],
                 allowed="the keyword arguments of cfgjobmod:tuned after the job: rounds=1, label='x'")
    expect_error(job_file(GOOD.replace("program: cfgjobmod:main", "program: cfgjobmod:main\nprogram_args: [1]")),
                 line=L_PROGRAM + 1, key="program_args", contains=["program_args must be a mapping"])



def test_args_are_checked_against_the_class(job_file):
    err = expect_error(job_file(GOOD.replace("num_envs: 4", "num_env: 4")), line=12, key="roles.rollout.args.num_env",
                       contains=["takes no argument 'num_env'"])
    assert "num_envs=8" in str(err.allowed)
    expect_error(job_file(GOOD.replace("args: {lr: 0.01}", "args: {hidden: 3}")), line=15, key="roles.learner.args",
                 contains=["needs argument(s) lr"])
    expect_error(job_file(GOOD.replace("num_envs: 4", "replica_index: 4")), line=12,
                 key="roles.rollout.args.replica_index", contains=["set by the runner"])


def test_class_taking_kwargs_accepts_any_args(job_file):
    text = GOOD.replace("class: cfgjobmod:Rollout", "class: cfgjobmod:Anything").replace("num_envs: 4", "whatever: 4")
    assert load_config(job_file(text)).roles["rollout"].args == {"whatever": 4}


def test_a_decorated_class_is_accepted_and_its_args_checked(job_file):
    text = GOOD.replace("class: cfgjobmod:Rollout", "class: cfgjobmod:Decorated").replace("num_envs: 4", "size: 4")
    assert load_config(job_file(text)).roles["rollout"].class_path == "cfgjobmod:Decorated"
    expect_error(job_file(text.replace("size: 4", "sise: 4")), line=12, key="roles.rollout.args.sise",
                 contains=["takes no argument 'sise'"])


def test_duplicate_key_names_both_lines(job_file):
    text = GOOD.replace("    replicas: 2\n", "    replicas: 2\n    replicas: 3\n")
    expect_error(job_file(text), line=L_REPLICAS + 1, key="roles.rollout.replicas",
                 contains=["duplicate key 'replicas' in roles.rollout (first at line 10)"])


def test_yaml_syntax_error_names_the_line(job_file):
    text = GOOD.replace("    replicas: 2", "    replicas: [2")
    err = expect_error(job_file(text), line=err_line(text), contains=["not valid YAML"])
    assert err.key is None


def err_line(text: str) -> int:
    import yaml
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        return (e.problem_mark or e.context_mark).line + 1
    raise AssertionError("text is valid YAML")


def test_empty_and_non_mapping_files(job_file):
    expect_error(job_file(""), line=1, contains=["empty"])
    expect_error(job_file("- job\n- roles\n"), line=1, contains=["must be a mapping"])


def test_non_string_keys(job_file):
    expect_error(job_file(GOOD.replace("  rollout:", "  1:")), line=L_ROLLOUT, contains=["keys must be strings"])


def test_unreadable_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=re.escape(path) + ": cannot read the job file"):
        load_config(path)


def test_config_error_survives_pickling(job_file):
    with pytest.raises(ConfigError) as info:
        load_config(job_file(GOOD.replace("replicas: 2", "replica: 2")))
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert (err.file, err.line, err.key, err.allowed) == (info.value.file, L_REPLICAS, "roles.rollout.replica",
                                                          tuple(ROLE_ALLOWED.split(", ")))
    assert str(err) == str(info.value)


# --------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml(job_file):
    cfg = load_config(job_file(GOOD), ["roles.rollout.replicas=3", "stop.max_seconds=30", "stop.max_frames=null",
                                       "roles.learner.args.hidden=128", "job.seed=7", "roles.rollout.device=cuda:1",
                                       "runtime.store_capacity=4GiB"])
    assert cfg.roles["rollout"].replicas == 3
    assert cfg.stop.max_seconds == 30.0 and cfg.stop.max_frames is None
    assert cfg.roles["learner"].args == {"lr": 0.01, "hidden": 128}
    assert cfg.job.seed == 7 and cfg.roles["rollout"].device == "cuda:1"
    assert cfg.runtime.store_capacity == "4GiB"
    assert cfg.overrides[0] == "roles.rollout.replicas=3"


def test_overrides_create_sections_and_roles(job_file):
    text = GOOD.split("stop:")[0]
    cfg = load_config(job_file(text), ["stop.max_seconds=5", "roles.extra={class: cfgjobmod:Anything, replicas: 2}",
                                       "roles.rollout.env.MY_FLAG=fast"])
    assert cfg.stop.max_seconds == 5.0
    assert cfg.roles["extra"].replicas == 2 and cfg.num_processes == 5
    assert cfg.roles["rollout"].env == {"MY_FLAG": "fast"}


def test_the_last_override_of_a_key_wins(job_file):
    cfg = load_config(job_file(GOOD), ["roles.rollout.replicas=3", "roles.rollout.replicas=4"])
    assert cfg.roles["rollout"].replicas == 4


@pytest.mark.parametrize("override,key,contains", [
    ("roles.rollout.replicas=abc", "roles.rollout.replicas", ["got 'abc' (str)", "allowed: int >= 1"]),
    ("roles.rollout.replica=3", "roles.rollout.replica", ["unknown key 'replica' in roles.rollout", ROLE_ALLOWED]),
    ("roles.rolout.replicas=3", "roles.rolout.replicas", ["unknown role 'rolout'", "allowed: learner, rollout"]),
    ("roles.rolout=3", "roles.rolout", ["unknown role 'rolout'"]),
    ("stop.max_secs=30", "stop.max_secs", ["unknown key 'max_secs' in stop"]),
    ("nothing.here=1", "nothing", ["unknown key 'nothing' at the top level"]),
    ("program.fn=x", "program.fn", ["program is a str, not a mapping"]),
    ("roles.rollout.replicas", None, ["not of the form dotted.key=value"]),
    ("=3", None, ["not of the form dotted.key=value"]),
    ("roles..replicas=3", None, ["not of the form dotted.key=value"]),
    ("roles.rollout.replicas=[3", "roles.rollout.replicas", ["is not valid YAML"]),
    ("runtime.start_method=fork", "runtime.start_method", ["CUDA"]),
    ("roles.rollout.args.num_env=2", "roles.rollout.args.num_env", ["takes no argument 'num_env'"]),
    ("roles.rollout.env.A=1", "roles.rollout.env", ["quote the value"]),
    ("address=auto", "runtime.address", ["backend: ray"]),
    ("roles.learner.class=cfgjobmod:Nope", "roles.learner.class", ["has no attribute 'Nope'"]),
])
def test_bad_overrides_name_the_override(job_file, override, key, contains):
    err = expect_error(job_file(GOOD), [override], line=None, key=key, contains=contains)
    assert f"override '{override}'" in str(err)


def test_mistake_in_the_file_is_still_reported_at_its_line_with_overrides(job_file):
    path = job_file(GOOD.replace("device: cpu", "").replace("replicas: 2", "replicas: two"))
    expect_error(path, ["stop.max_seconds=3"], line=L_REPLICAS, key="roles.rollout.replicas")


# --------------------------------------------------------------------------- the reference


def test_docs_describe_every_key():
    """docs/yaml.md is pasted into the README: every key of the schema must be in it."""
    doc = (REPO / "docs" / "yaml.md").read_text()
    for section, keys in (("job", JOB_KEYS), ("runtime", RUNTIME_KEYS), ("roles.<name>", ROLE_KEYS),
                          ("stop", STOP_KEYS)):
        for key in keys:
            assert f"`{key}`" in doc, f"{section}.{key} is not documented in docs/yaml.md"
    assert "`program`" in doc


# --------------------------------------------------------------------------- hostile YAML

HOSTILE = [
    # (what, text, line, words in the message)
    ("bad !!int", "job: {name: x, seed: !!int abc}\n", 1, ["!!int", "'abc'"]),
    ("bad !!float", "job:\n  name: x\n  seed: !!float zz\n", 3, ["!!float"]),
    ("bad !!bool", "job:\n  name: x\n  seed: !!bool maybe\n", 3, ["!!bool"]),
    ("python tag", "job:\n  name: !!python/name:os.system x\n", 2, ["!!python/name:os.system", "not used"]),
    ("custom tag", "job:\n  name: !mine x\n", 2, ["!mine"]),
    ("binary tag", "job:\n  name: !!binary aGVsbG8=\n", 2, ["!!binary"]),
    ("tag on a map", "job: !!omap\n  - name: x\n", 1, ["!!omap", "list"]),
    ("set tag", "job: !!set {name: x}\n", 1, ["!!set", "mapping"]),
    ("tag on a list", "job: {name: x}\nroles: !mine [a]\n", 2, ["!mine", "list"]),
    ("control character", "job:\n  name: x\x01y\n", 2, ["#x0001"]),
    ("escape character", "job: {name: x}\n\x1b[31m: 1\n", 2, ["#x001b"]),
    ("merge of a scalar", "job:\n  <<: 5\n  name: x\n", 2, ["`<<` merges mappings", "5"]),
    ("merge of a list of scalars", "job:\n  <<: [1, 2]\n  name: x\n", 2, ["`<<` merges mappings"]),
    ("recursive alias", "job: &a\n  name: x\n  again: *a\n", 3, ["recursive alias"]),
    ("recursive merge", "job: &a\n  name: x\n  <<: *a\n", 1, ["recursive alias"]),
    ("recursive list", "job: {name: x}\nroles: &r [1, *r]\n", 2, ["recursive alias"]),
    ("undefined alias", "job: *nope\n", 1, ["not valid YAML"]),
    ("two documents", "job: {name: x}\n---\njob: {name: y}\n", 2, ["not valid YAML"]),
    ("deep nesting", "job: {name: x}\nprogram_args: {a: " + "[" * 100 + "]" * 100 + "}\n", 2, ["nested"]),
    ("deep merges", "job: {name: x}\nprogram_args: " + "{<<: " * 300 + "{a: 1}" + "}" * 300 + "\n", 2, ["nested"]),
    ("deeper merges", "job: {name: x}\nprogram_args: " + "{<<: " * 2000 + "{a: 1}" + "}" * 2000 + "\n", 1,
     ["nested"]),
    ("huge int seed", "job: {name: x, seed: " + "9" * 30 + "}\n", 1, ["job.seed"]),
    ("too long int", "job: {name: x, seed: " + "9" * 5000 + "}\n", 1, ["job.seed"]),
    ("huge max_seconds", "stop: {max_seconds: " + "9" * 400 + "}\njob: {name: x}\n", 1, ["too large"]),
    ("value tag as value", "job: {name: =}\n", 1, ["job.name"]),
]


@pytest.mark.parametrize("what,text,line,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_yaml_is_a_config_error_at_its_line(job_file, what, text, line, words):
    body = text + ("roles: {w: {class: cfgjobmod:Anything}}\n" if "roles" not in text else "")
    body += "program: cfgjobmod:main\n"
    path = job_file(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert "; allowed: " in msg
    for w in words:
        assert w in msg, msg


def test_plain_scalar_tags_are_read_as_written(job_file):
    cfg = load_config(job_file("""\
        job: {name: !!str tagged, seed: !!int "12"}
        roles: {w: {class: cfgjobmod:Anything, args: {a: !!float 1, b: !!str 5, c: !!null ~, d: !!bool yes}}}
        program: cfgjobmod:main
    """))
    assert cfg.job.seed == 12 and cfg.job.name == "tagged"
    assert cfg.roles["w"].args == {"a": 1.0, "b": "5", "c": None, "d": True}


def _bomb(levels: int, width: int = 9) -> str:
    """A billion-laughs job file: each level lists the previous one ``width`` times."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return ("job: {name: bomb}\nprogram: cfgjobmod:main\nroles:\n  w:\n    class: cfgjobmod:Anything\n"
            "    args:\n" + "".join(f"      {ln}\n" for ln in lines))


@pytest.mark.parametrize("levels", [5, 9])
def test_alias_bombs_are_refused_fast(job_file, levels):
    text = _bomb(levels)
    assert len(text) < 1100
    path = job_file(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb") as info:
        load_config(path)
    assert time.perf_counter() - t0 < 1.0
    assert info.value.line is not None


def test_merge_bombs_are_refused_fast(job_file):
    lines = ["a0: &a0 {k0: 1, k1: 2, k2: 3}"]
    for i in range(1, 30):
        lines.append(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}, *a{i - 1}], k{i + 2}: {i}}}")
    text = "job: {name: m}\nprogram: cfgjobmod:main\nroles:\n  w:\n    class: cfgjobmod:Anything\n    args:\n"
    text += "".join(f"      {ln}\n" for ln in lines)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(job_file(text))
    assert time.perf_counter() - t0 < 1.0


def test_aliases_used_within_the_budget_are_expanded(job_file):
    cfg = load_config(job_file(_bomb(4)))
    assert cfg.roles["w"].args["l3"] == [[[["lol"] * 9] * 9] * 9] * 9


@pytest.mark.parametrize("replicas,line_of", [("5000", "replicas: 5000"), ("1024", "replicas: 1024")])
def test_more_replicas_than_a_job_holds_are_refused(job_file, replicas, line_of):
    text = GOOD.replace("replicas: 2", f"replicas: {replicas}")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == line_of)
    expect_error(job_file(text), line=line, key="roles.rollout.replicas", contains=["at most 1023"])


def test_replicas_over_all_roles_are_bounded_too(job_file):
    text = GOOD.replace("replicas: 2", "replicas: 1023")
    expect_error(job_file(text), line=L_LEARNER, key="roles.learner.replicas",
                 contains=["add up to 1024 actor processes", "at most 1023 replicas over all roles"])
    assert load_config(job_file(GOOD.replace("replicas: 2", "replicas: 1022"))).num_processes == 1023


def test_minus_one_means_unlimited_restarts_and_retries(job_file):
    cfg = load_config(job_file(GOOD), ["roles.rollout.max_restarts=-1", "roles.rollout.max_task_retries=-1"])
    assert cfg.roles["rollout"].max_restarts == -1 and cfg.roles["rollout"].max_task_retries == -1


def test_start_timeout_is_a_positive_number_or_null(job_file):
    assert load_config(job_file(GOOD)).roles["rollout"].start_timeout == 120.0
    cfg = load_config(job_file(GOOD), ["roles.rollout.start_timeout=null", "roles.learner.start_timeout=2.5"])
    assert cfg.roles["rollout"].start_timeout is None and cfg.roles["learner"].start_timeout == 2.5
    expect_error(job_file(GOOD), ["roles.rollout.start_timeout=0"], line=None, key="roles.rollout.start_timeout",
                 contains=["seconds > 0"])


@pytest.mark.parametrize("override", ["roles.rollout.replicas=!!int abc", "roles.rollout.args={a: !!set {}}",
                                      "job.name=\x07", "job.name=*x", "job.name=!!python/object:os.system x"])
def test_hostile_override_values_name_the_override(job_file, override):
    err = expect_error(job_file(GOOD), [override], line=None, contains=["is not valid YAML"])
    assert f"override '{override}'" in str(err)


# A fuzzer: random and mutated job files give a JobConfig or a ConfigError, never another
# exception, and each is checked fast.
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SEEDS = [GOOD, _bomb(3), textwrap.dedent("""\
    job: {name: m, seed: !!int 3}
    runtime: {store_capacity: 1GiB, num_threads: null}
    roles:
      a: &base {class: cfgjobmod:Rollout, args: {num_envs: 2}, replicas: 2}
      b: {<<: *base, replicas: 3, start_timeout: 5}
    program: cfgjobmod:tuned
    program_args: {rounds: 2, label: "\\x41"}
    stop: {max_seconds: 1.5e3, target_return: -.inf}
""")]
TOKENS = ["&a ", "*a", "<<: ", "!!int ", "!!set ", "!x ", "!!python/tuple ", "[", "]", "{", "}", ": ", "- ", "\n",
          "  ", "'", '"', "\\", "\t", "\x00", "\x01", "\x85", "\ufeff", "---\n", "...\n", "? ", "|\n", ">-\n",
          "%YAML 1.1\n", "#", "9" * 400, ".nan", "~", "null", "1e999", "0x", "0o7", "2001-13-45", "=", ",", "%"]


@st.composite
def mutated(draw) -> bytes:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(TOKENS) | st.text(max_size=4))
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)):]
        else:
            text = text[:pos] + piece + text[pos + len(piece):]
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        i = draw(st.integers(0, max(0, len(data) - 1)))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return data


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated() | st.binary(max_size=300))
def test_fuzzed_job_files_give_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "; allowed: " in str(e)
    assert time.perf_counter() - t0 < 2.0
