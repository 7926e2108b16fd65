"""What the workflow catalogue asks of a repository: the rules' conda environment installs
what `make` installs, a citation file, a licence, and a README for every config."""

import datetime
import re
from pathlib import Path

import pytest
import yaml

from opdgeo.version import package_version

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"


def requirement_pins(path: Path) -> set[str]:
    pins = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {pin for pin in pins if pin}


def conda_pins(path: Path) -> set[str]:
    dependencies = yaml.safe_load(path.read_text())["dependencies"]
    pip = [d["pip"] for d in dependencies if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{path}: expected one pip section"
    return set(pip[0])


def pin_differences(conda_file: Path, requirements: Path) -> tuple[set[str], set[str]]:
    """(pins only in the conda file, pins only in requirements.txt)."""
    conda, pip = conda_pins(conda_file), requirement_pins(requirements)
    return conda - pip, pip - conda


def test_conda_environment_pins_what_requirements_pin():
    only_conda, only_pip = pin_differences(ENVS / "opdgeo.yaml", ENVS / "requirements.txt")
    assert not only_conda and not only_pip, (
        f"envs/opdgeo.yaml and envs/requirements.txt differ: only in the conda file "
        f"{sorted(only_conda)}, only in requirements.txt {sorted(only_pip)}")
    assert all("==" in pin for pin in conda_pins(ENVS / "opdgeo.yaml")), "every pin is exact"


def test_a_pin_changed_in_one_file_only_is_a_difference(tmp_path):
    text = (ENVS / "opdgeo.yaml").read_text()
    assert "torch==2.13.0" in text
    (tmp_path / "opdgeo.yaml").write_text(text.replace("torch==2.13.0", "torch==2.12.0"))
    assert pin_differences(tmp_path / "opdgeo.yaml", ENVS / "requirements.txt") == (
        {"torch==2.12.0"}, {"torch==2.13.0"})


def test_every_rule_runs_in_the_conda_environment_with_this_package():
    """`conda:` on every rule that runs a command (the catalogue's lint, `make lint`, asks for
    it); Snakemake runs the post-deploy script in the new environment."""
    rules = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
    for path in rules:
        text = path.read_text()
        assert text.count("shell:") == text.count("conda:\n"), path.name
    env = re.search(r'^CONDA_ENV = "(.+)"$', (ROOT / "workflow/rules/common.smk").read_text(),
                    re.M)
    assert (ROOT / "workflow" / "rules" / env[1]).resolve() == ENVS / "opdgeo.yaml"
    script = ENVS / "opdgeo.post-deploy.sh"
    assert "pip install --no-deps -e ." in script.read_text() and script.stat().st_mode & 0o111


CFF_REQUIRED = ("cff-version", "message", "title", "authors")
CFF_REFERENCE_REQUIRED = ("type", "title", "authors")


def citation_errors(cff: dict) -> list[str]:
    """The Citation File Format 1.2.0's required keys and the shapes of the ones we use."""
    errors = [f"missing {key}" for key in CFF_REQUIRED if key not in cff]
    if cff.get("cff-version") != "1.2.0":
        errors.append(f"cff-version {cff.get('cff-version')!r}, expected '1.2.0'")

    def people(authors, where):
        if not isinstance(authors, list) or not authors:
            return [f"{where}: authors must be a non-empty list"]
        return [f"{where}: an author needs family-names or (entity) name: {a}"
                for a in authors if not (isinstance(a, dict) and
                                         ({"family-names", "name"} & set(a)))]

    errors += people(cff.get("authors"), "software")
    for i, ref in enumerate(cff.get("references", [])):
        errors += [f"reference {i}: missing {key}" for key in CFF_REFERENCE_REQUIRED
                   if key not in ref]
        errors += people(ref.get("authors"), f"reference {i}")
    if "date-released" in cff and not isinstance(cff["date-released"], datetime.date):
        errors.append("date-released must be a YYYY-MM-DD date")
    return errors


def test_citation_file_is_valid_cff_and_cites_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation_errors(cff) == []
    assert cff["version"] == package_version()
    assert cff["license"] == "MIT"
    paper = cff["references"][0]
    assert paper["url"].endswith("2606.13657") and len(paper["authors"]) == 6


@pytest.mark.parametrize("drop", CFF_REQUIRED)
def test_citation_check_names_a_missing_key(drop):
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    del cff[drop]
    assert f"missing {drop}" in citation_errors(cff)


def test_licence_and_config_readme():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    readme = (ROOT / "config" / "README.md").read_text()
    for config in sorted((ROOT / "config").glob("*.yaml")):
        assert f"`{config.name}`" in readme, f"config/README.md does not describe {config.name}"
