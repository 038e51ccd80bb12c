"""DirectorySource: documents per file, reload on change, broken files kept apart, version choice."""

from __future__ import annotations

import os

import pytest

from overnight.templates import (
    DirectorySource,
    ProfileNotFound,
    StaticSource,
    TemplateInvalidError,
    TemplateNotFound,
    TemplateSourceError,
)
from tests.templates._yaml import PROFILE, template_yaml


def _bump(path, text: str) -> None:  # type: ignore[no-untyped-def]
    """Write and move the mtime well into the past, so the test does not rely on the racy re-read."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def test_several_documents_per_file_by_kind_by_shape_and_as_lists(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "all.yaml").write_text(
        template_yaml("a") + "---\n" + PROFILE + "---\n"
        # no kind: a spec makes it a template, its absence a profile
        + template_yaml("b").replace("kind: ModelDeploymentTemplate\n", "") + "---\n"
        + "name: plain-profile\nenv: {A: '1'}\n---\n"
        # AIBrix's ConfigMap shape
        + "templates:\n" + "\n".join("  " + line if i else "- " + line for i, line in enumerate(
            template_yaml("c").replace("kind: ModelDeploymentTemplate\n", "").splitlines()))
        + "\nprofiles:\n- name: listed-profile\n---\n"
    )
    (tdir / "more.yml").write_text(template_yaml("d"))
    (tdir / "notes.txt").write_text("not read")
    (tdir / ".hidden.yaml").write_text("not: read: at all")
    source = DirectorySource(tdir)
    assert source.errors() == []
    assert [t.name for t in source.list_templates()] == ["a", "b", "c", "d"]
    assert [p.name for p in source.list_profiles()] == ["gpu-box", "listed-profile", "plain-profile"]
    where, _ = source.locate_template("c")
    assert where == f"{tdir}/all.yaml: document 5, templates[0] (c)"


def test_unknown_kind_and_non_mapping_documents_are_errors(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "x.yaml").write_text("kind: Deployment\nname: x\n---\n- a\n- b\n")
    assert DirectorySource(tdir).errors() == [
        f"{tdir}/x.yaml: document 1: kind: 'Deployment' is not ModelDeploymentTemplate or Profile",
        f"{tdir}/x.yaml: document 2: expected a mapping (a template or a profile), got list",
    ]


def test_yaml_syntax_and_duplicate_keys_name_the_line(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "syntax.yaml").write_text("name: a\nspec: [unclosed\n")
    (tdir / "dup.yaml").write_text(template_yaml("dup") + "name: again\n")
    errors = DirectorySource(tdir).errors()
    assert len(errors) == 2
    assert errors[0].startswith(f"{tdir}/dup.yaml: line 17: not valid YAML: ") and "'name' is given twice" in errors[0]
    assert errors[1].startswith(f"{tdir}/syntax.yaml: line 3: not valid YAML: ")


def test_reload_on_change_add_and_remove(tdir) -> None:  # type: ignore[no-untyped-def]
    f = tdir / "m.yaml"
    _bump(f, template_yaml("m", "1.0"))
    now = [0.0]
    source = DirectorySource(tdir, reload_s=5, clock=lambda: now[0])
    assert source.get_template("m").version == "1.0"
    _bump(f, template_yaml("m", "2.0"))
    assert source.get_template("m").version == "1.0"  # checked less than reload_s ago
    now[0] = 5.0
    assert source.get_template("m").version == "2.0"
    _bump(tdir / "n.yaml", template_yaml("n"))
    f.unlink()
    assert source.refresh() is True
    assert [t.name for t in source.list_templates()] == ["n"]
    assert source.refresh() is False


def test_an_edit_within_the_same_mtime_tick_is_seen(tdir) -> None:  # type: ignore[no-untyped-def]
    f = tdir / "m.yaml"
    f.write_text(template_yaml("m", "1.0"))
    stamp = f.stat()
    source = DirectorySource(tdir, reload_s=None)
    f.write_text(template_yaml("m", "3.0"))  # same size
    os.utime(f, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and the same mtime
    assert source.refresh() is True
    assert source.get_template("m").version == "3.0"


def test_a_broken_file_does_not_take_the_others_down(tdir) -> None:  # type: ignore[no-untyped-def]
    good, bad = tdir / "good.yaml", tdir / "bad.yaml"
    _bump(good, template_yaml("good") + "---\n" + PROFILE)
    _bump(bad, template_yaml("bad", "1.0"))
    source = DirectorySource(tdir, reload_s=0)
    assert source.get_template("bad").version == "1.0"

    # The file stops parsing: what it defined fails with its error; the rest works.
    _bump(bad, "kind: ModelDeploymentTemplate\nname: bad\nspec: {engine: [\n")
    assert source.get_template("good").name == "good"
    assert source.get_profile("gpu-box").name == "gpu-box"
    with pytest.raises(TemplateInvalidError) as info:
        source.get_template("bad")
    assert f"{bad}: line 4: not valid YAML" in info.value.message
    assert source.errors() == info.value.issues

    # A document that parses but breaks a rule fails with its field.
    _bump(bad, template_yaml("bad", "1.0", count=2, tp=4))
    with pytest.raises(TemplateInvalidError) as info:
        source.get_template("bad", "1.0")
    assert f"{bad}: document 1 (bad): spec.parallelism: tp*pp*dp*ep" in info.value.message
    assert source.get_template("good").name == "good"

    _bump(bad, template_yaml("bad", "1.1"))
    assert source.get_template("bad").version == "1.1"
    assert source.errors() == []


def test_latest_active_version_and_explicit_versions(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "m.yaml").write_text("---\n".join([
        template_yaml("m", "1.9"),
        template_yaml("m", "1.10"),  # semantic order: 1.10 > 1.9
        template_yaml("m", "2.0", status="deprecated"),
        template_yaml("m", "3.0", status="draft"),
        template_yaml("old", "1.0", status="deprecated"),
    ]))
    source = DirectorySource(tdir)
    assert source.get_template("m").version == "1.10"
    assert source.get_template("m", "").version == "1.10"
    assert source.get_template("m", "2.0").status == "deprecated"
    assert source.get_template("m", "3.0").status == "draft"
    assert [t.version for t in source.list_templates() if t.name == "m"] == ["3.0", "2.0", "1.10", "1.9"]
    with pytest.raises(TemplateNotFound) as info:
        source.get_template("old")
    assert info.value.message == "model template 'old' has no active version (versions: 1.0 (deprecated)); name one"


def test_unknown_name_or_version_is_not_found_naming_it(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "m.yaml").write_text(template_yaml("m", "1.0") + "---\n" + PROFILE)
    source = DirectorySource(tdir)
    with pytest.raises(TemplateNotFound) as info:
        source.get_template("nope")
    assert info.value.message == "model template 'nope' not found" and info.value.code == "template_not_found"
    with pytest.raises(TemplateNotFound) as info:
        source.get_template("m", "9.9")
    assert info.value.message == "model template 'm' has no version '9.9' (versions: 1.0 (active))"
    with pytest.raises(ProfileNotFound) as pinfo:
        source.get_profile("nope")
    assert pinfo.value.message == "profile 'nope' not found"


def test_the_same_template_twice_is_ambiguous(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "a.yaml").write_text(template_yaml("m", "1.0") + "---\n" + template_yaml("m", "2.0"))
    (tdir / "b.yaml").write_text(template_yaml("m", "1.0"))
    source = DirectorySource(tdir)
    assert source.errors() == [
        f"{tdir}/b.yaml: document 1 (m): template 'm' version '1.0' is also defined in {tdir}/a.yaml: document 1 (m)"
    ]
    assert source.get_template("m", "2.0").version == "2.0"
    with pytest.raises(TemplateInvalidError):
        source.get_template("m", "1.0")


def test_a_missing_directory_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TemplateSourceError, match="does not exist"):
        DirectorySource(tmp_path / "nope")


def test_static_source_validates_what_it_is_given() -> None:
    import yaml

    source = StaticSource([yaml.safe_load(template_yaml("s"))], [{"name": "p", "env": {"X": 1}}])
    assert source.get_template("s").name == "s" and source.get_profile("p").env == {"X": "1"}
