"""Profile files across versions: version 2 stores what the profiler derives from its measurements (the stack factor,
planner.cost.profiled.stack_fit); a version-1 file loads through the same function once, on load, and the profile
says what was derived (Profile.derived, and the job's notes through estimate.job_profile)."""

from pathlib import Path

import yaml

from planner.core.profile import GROWTH_NOTE, MAX_TOKENS_NOTE, PROFILE_VERSION, read_profile, save_profile
from planner.cost.profiled import (STACK_MEASURED, STACK_MIGRATED, load_profile, migration_note, profile_from_dict,
                                   stack_fit, with_derived)

ROOT = Path(__file__).resolve().parents[2]
GPT2_XL_2XH200 = ROOT / "benchmarks/results/profile_2xh200/session5/profile-gpt2-xl-s1024.yaml"
def test_a_version_1_profile_derives_its_factor_once_on_load_and_a_saved_one_stores_it(tmp_path):
    """The profiler derives the factor and stores it (version 2); a version-1 file, which has only the measurements,
    gets it on load from the same function (stack_fit), and its `derived` notes and the job's notes say so."""
    old = yaml.safe_load(GPT2_XL_2XH200.read_text())
    assert old["version"] == 1 and "stack_factor" not in old
    profile = load_profile(GPT2_XL_2XH200)
    assert profile.file_version == 1 and profile.stack == stack_fit(profile) and profile.stack.compute_bound > 1.05
    assert dict(profile.derived)["stack_factor"] == STACK_MIGRATED
    note = migration_note(profile, "p.yaml")
    assert note.startswith("profile: p.yaml is a version-1 file: ") and f"stack_factor {STACK_MIGRATED}" in note
    save_profile(profile, tmp_path / "p.yaml")
    stored = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert stored["version"] == PROFILE_VERSION
    assert stored["stack_factor"]["compute_bound"] == profile.stack.compute_bound
    again = load_profile(tmp_path / "p.yaml")
    assert again.stack == profile.stack and again.file_version == PROFILE_VERSION and migration_note(again) is None
    for tokens in (None, 512, 1024, 4096, 16384):
        assert again.stack_factor(tokens) == profile.stack_factor(tokens)
    # a current file's stored factor is the one used: the raw stacks are not read again
    stored["stack_factor"]["compute_bound"] = 1.5
    assert profile_from_dict(stored, "t").stack_factor() == 1.5
    del stored["stack_factor"]
    assert profile_from_dict(stored, "t").stack is None and profile_from_dict(stored, "t").stack_factor() == 1.0
    # the profiler's own note where it derives it
    assert dict(with_derived(profile).derived)["stack_factor"] == STACK_MEASURED


def test_only_the_door_derives_the_factor_of_a_version_1_file():
    """planner.core.profile reads the file as stored (schema and file io); planner.cost.profiled's door migrates it."""
    stored = read_profile(GPT2_XL_2XH200)
    assert stored.file_version == 1 and stored.stack is None
    assert load_profile(GPT2_XL_2XH200).stack == stack_fit(stored) is not None


def test_older_fields_derived_on_load_are_named():
    """A version-1 file without a sharding entry's max_tokens, or with the additive pipeline growth, gets them from
    its raw points as before, and `derived` says so."""
    old = load_profile(ROOT / "benchmarks/results/profile_2xh200/session4/profile-gpt2-xl-s1024-quick.yaml")
    assert dict(old.derived)["sharding.max_tokens"] == MAX_TOKENS_NOTE and all(s.max_tokens > 0 for s in old.sharding)
    additive = load_profile(ROOT / "benchmarks/results/profile_2xh200/profile-llama-3-8b-s4096-quick-2xh200.yaml")
    assert dict(additive.derived)["pipeline.growth_per_op"] == GROWTH_NOTE
    assert "pipeline.growth_per_op" in migration_note(additive, "p.yaml")
