"""MLflow's basic-auth app with one rule added, so the server itself enforces who changes `champion`.

`perennial services up --auth` runs ``mlflow server --app-name perennial-auth``: the name resolves through the
entry-point group ``mlflow.app`` (pyproject.toml) to `create_app`, which is MLflow's own
``mlflow.server.auth:create_app`` (users, passwords, READ / EDIT / MANAGE grants, admins) after one change to
its table of before-request validators: setting or deleting a registered model's alias other than `challenger`
also takes CHAMPION_PERMISSION (MANAGE) on the registered model, the permission `perennial promote`,
`rollback` and `unpromote` check (perennial/registry.py, `authorized_user`). MLflow's own basic-auth app lets
any EDIT holder set an alias, so the retrain identity (EDIT, to register versions) could move `champion` with
a raw REST call or in the UI.

- Both REST and UI (ajax) routes and every method MLflow serves for alias changes (POST set, DELETE delete)
  are covered: the routes are found by their request class, as MLflow builds its own table, not by path.
- `challenger` keeps MLflow's rules (set: EDIT), because every retrain sets it on its new version. Deleting
  any alias already takes MLflow's delete permission, which only MANAGE carries.
- Renaming a registered model takes CHAMPION_PERMISSION too: a rename carries the model's aliases with it, so
  an EDIT holder could otherwise rename the lineage's model away and create one of that name (its creator
  holds MANAGE) whose `champion` is a version of their choosing.
- Admins pass, as everywhere in MLflow's app. Prompts (registered models MLflow tags as prompts) take the same
  rule on their own grants. A refusal is MLflow's own: HTTP 403 with the text body ``Permission denied``, which
  the Python client raises as an MlflowException with error_code PERMISSION_DENIED. Nothing changes.

MLflow and perennial.registry only: no torch, nothing of the layers above (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Callable

from mlflow.server import app as mlflow_flask_app
from mlflow.server import auth
from mlflow.server.auth.permissions import Permission, get_permission

from perennial.registry import CHALLENGER, CHAMPION_PERMISSION

APP_NAME = "perennial-auth"  # `mlflow server --app-name perennial-auth` (pyproject.toml, entry points "mlflow.app")
# Aliases whose changes keep MLflow's own rules: the one a retrain (EDIT) sets on each version it registers.
EDIT_ALIASES = frozenset({CHALLENGER})

_FLAGS = ("can_read", "can_use", "can_update", "can_delete", "can_manage")


def holds(held: Permission, required: str) -> bool:
    """Whether ``held`` allows everything the permission named ``required`` allows (MANAGE covers EDIT...)."""
    needed = get_permission(required)
    return all(getattr(held, flag) for flag in _FLAGS if getattr(needed, flag))


def _holds_champion_permission() -> bool:
    """The authenticated user holds CHAMPION_PERMISSION on the request's registered model, by MLflow's own lookup
    (user grants, roles, default_permission; a prompt's own grants for a prompt)."""
    return holds(auth._get_permission_from_registered_model_or_prompt_name(), CHAMPION_PERMISSION)


def _alias_change(mlflow_validator: Callable[[], bool]) -> Callable[[], bool]:
    def validate_can_change_alias() -> bool:
        if not mlflow_validator():
            return False
        return auth._get_request_param("alias") in EDIT_ALIASES or _holds_champion_permission()

    return validate_can_change_alias


def _rename(mlflow_validator: Callable[[], bool]) -> Callable[[], bool]:
    def validate_can_rename_registered_model() -> bool:
        return mlflow_validator() and _holds_champion_permission()

    return validate_can_rename_registered_model


GUARDED = {auth.SetRegisteredModelAlias: _alias_change, auth.DeleteRegisteredModelAlias: _alias_change,
           auth.RenameRegisteredModel: _rename}


def guarded_routes() -> dict[tuple[str, str], type]:
    """(path, method) -> request class of every route MLflow serves for GUARDED's requests, REST and ajax alike:
    found as MLflow builds its own validator table (`get_endpoints`), so no path or method is missed."""
    return {(path, method): request_class
            for path, request_class, methods in auth.get_endpoints(lambda request_class: request_class)
            if request_class in GUARDED for method in methods}


_guarded: set[tuple[str, str]] = set()


def create_app(app=mlflow_flask_app):
    """MLflow's basic-auth app (`mlflow.server.auth.create_app`) with GUARDED's routes taking CHAMPION_PERMISSION
    as well as what MLflow asks. Wraps each route once, however often it is called."""
    routes = guarded_routes()
    if {method for (path, method), request_class in routes.items() if request_class is not auth.RenameRegisteredModel} != {"POST", "DELETE"}:
        # MLflow changed how it serves alias changes: refuse to start rather than serve one unguarded
        raise RuntimeError(f"{APP_NAME}: MLflow's registered-model alias routes are not where this app expects them: {sorted(routes)}")
    for route, request_class in routes.items():
        if route not in _guarded:
            auth.BEFORE_REQUEST_VALIDATORS[route] = GUARDED[request_class](auth.BEFORE_REQUEST_VALIDATORS[route])
            _guarded.add(route)
    return auth.create_app(app)
