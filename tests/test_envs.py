"""The conda environment files pin the same versions as requirements.txt."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*-?\s*([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_env_files_match_requirements():
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "no conda environment files in envs/"
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        got = pins(f"- {p}" for p in pip)
        assert got, f"{env.name} pins nothing"
        for name, version in got.items():
            assert name in required, f"{env.name}: {name} is not in requirements.txt"
            assert required[name] == version, (
                f"{env.name}: {name}=={version} but requirements.txt pins {required[name]}")


def test_every_rule_names_an_env():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        bodies = re.split(r"^rule \w+:", text, flags=re.M)[1:]
        # a target rule (input only, like `all` or `apply`) runs nothing and needs no env
        jobs = [b for b in bodies if re.search(r"^\s+(script|shell|run|wrapper):", b, re.M)]
        missing = [b.splitlines()[1].strip() for b in jobs if "conda:" not in b]
        assert not missing, f"{smk.name}: {len(missing)} rules without a conda: entry"
