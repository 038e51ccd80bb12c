"""Model deployment templates and profiles (AIBrix's field names).

* ``schema``: the documents (``ModelDeploymentTemplate``, ``Profile``) and their rules;
* ``source``: where they come from (``DirectorySource``) and how one is looked up;
* ``resolve``: a batch's references + overrides -> a frozen ``Resolved`` record;
* ``commands``: the engine's command line and the ``local`` runtime's spec.

See docs/templates.md.
"""

from overnight.templates.commands import engine_command, local_spec
from overnight.templates.resolve import Resolved, check_endpoint, resolve
from overnight.templates.schema import ModelDeploymentTemplate, Profile, TemplateSchemaError
from overnight.templates.source import (
    DirectorySource,
    ProfileNotFound,
    StaticSource,
    TemplateInvalidError,
    TemplateNotFound,
    TemplateSource,
    TemplateSourceError,
)

__all__ = [
    "DirectorySource",
    "ModelDeploymentTemplate",
    "Profile",
    "ProfileNotFound",
    "Resolved",
    "StaticSource",
    "TemplateInvalidError",
    "TemplateNotFound",
    "TemplateSchemaError",
    "TemplateSource",
    "TemplateSourceError",
    "check_endpoint",
    "engine_command",
    "local_spec",
    "resolve",
]
