"""``overnight templates``: list, show and validate model deployment templates and profiles."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["templates_app"]

templates_app = typer.Typer(no_args_is_help=True, add_completion=False)

DirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--templates-dir",
        envvar="OVERNIGHT_TEMPLATES_DIR",
        show_envvar=True,
        help="Directory of template and profile YAML files.",
        show_default="none: it must be given",
    ),
]


def _source(directory: Path | None):  # type: ignore[no-untyped-def]
    from overnight.templates import DirectorySource, TemplateSourceError

    if directory is None:
        typer.secho("no templates directory: give --templates-dir or set OVERNIGHT_TEMPLATES_DIR", err=True,
                    fg=typer.colors.RED)
        raise typer.Exit(2)
    try:
        return DirectorySource(directory, reload_s=None)
    except TemplateSourceError as exc:
        typer.secho(exc.message, err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def _warn_errors(errors: list[str]) -> None:
    if errors:
        typer.secho(f"{len(errors)} problem(s) in the templates; run `overnight templates validate`", err=True,
                    fg=typer.colors.YELLOW)


@templates_app.command("list")
def list_(templates_dir: DirOption = None) -> None:
    """List every template (newest version first) and profile."""
    source = _source(templates_dir)
    rows = [("KIND", "NAME", "VERSION", "STATUS", "ENGINE", "ACCELERATOR", "ENDPOINTS")]
    for t in source.list_templates():
        acc = t.spec.accelerator
        rows.append(("template", t.name, t.version, t.status, t.spec.engine.type, f"{acc.count}x {acc.type}",
                     ",".join(t.spec.supported_endpoints)))
    for p in source.list_profiles():
        rows.append(("profile", p.name, "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    _warn_errors(source.errors())


@templates_app.command()
def show(
    name: Annotated[str, typer.Argument(help="Template (or, with --profile, profile) name.")],
    version: Annotated[Optional[str], typer.Option(
        "--version", help="Template version.", show_default="the latest active version")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Show the profile NAME instead of a template.")] = False,
    templates_dir: DirOption = None,
) -> None:
    """Print one template (with the command it starts) or profile as YAML."""
    import yaml

    from overnight.errors import OvernightError
    from overnight.templates import engine_command

    source = _source(templates_dir)
    try:
        where, doc = source.locate_profile(name) if profile else source.locate_template(name, version)
    except OvernightError as exc:
        typer.secho(exc.message, err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    body = {"kind": "Profile" if profile else "ModelDeploymentTemplate", **doc.model_dump(mode="json", exclude_none=True)}
    typer.echo(f"# {where}")
    typer.echo(yaml.safe_dump(body, sort_keys=False).rstrip())
    if not profile:
        typer.echo(f"# command: {shlex.join(engine_command(doc))}")


@templates_app.command()
def validate(
    path: Annotated[Optional[Path], typer.Argument(
        help="A YAML file or a directory of them.", show_default="--templates-dir")] = None,
    templates_dir: DirOption = None,
) -> None:
    """Check templates and profiles; print each problem with its file and field; exit 1 if any."""
    from overnight.templates.source import Catalog, load_file

    target = path or templates_dir
    if target is not None and target.is_file():
        loaded = load_file(target)
        errors = Catalog.build([loaded]).issues
        counts = (len(loaded.templates), len(loaded.profiles))
    else:
        source = _source(target)
        errors = source.errors()
        counts = (len(source.list_templates()), len(source.list_profiles()))
    for line in errors:
        typer.echo(line, err=True)
    if errors:
        typer.secho(f"{len(errors)} problem(s)", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.echo(f"ok: {counts[0]} template(s), {counts[1]} profile(s)")
