"""A wasd provider in Python: a static table of endpoints from the provider's settings.

Settings (the provider's `settings` table in the host config, handed over as JSON):

    {"services": {"basket": [{"host": "10.0.0.7", "port": 8443, "scheme": "https"},
                             {"host": "10.0.0.8", "port": 9000, "name": "dashboard"}]},
     "ttl-ms": 5000}

Endpoint keys: `host` (required), `port`, `scheme`, `name`, `path`, `metadata`.
`_dashboard.basket` asks for the endpoints named `dashboard`, `basket` for the unnamed.

Build: componentize-py -d ../../../wit -w provider componentize app -o static-table.wasm
(componentize-py generates the `wit_world` bindings itself; none are kept here).
"""

import json
from typing import Any, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log
from wit_world.imports.types import (
    Configuration,
    Endpoint,
    Error_Internal,
    Error_InvalidSettings,
    Error_Unsupported,
    Query,
    Resolution,
)

# The largest integer JSON parsers keep exact (JavaScript's Number.MAX_SAFE_INTEGER).
MAX_SAFE_INTEGER = 2**53 - 1


class Invalid(Exception):
    """Settings that make no sense; the message names the place."""


# Set by configure: lower-cased service name -> [(lower-cased endpoint name, Endpoint)].
_services: Optional[dict[str, list[tuple[Optional[str], Endpoint]]]] = None
_ttl_ms: Optional[int] = None


class Resolver(exports.Resolver):
    def configure(self, config: Configuration) -> None:
        global _services, _ttl_ms
        try:
            _services, _ttl_ms = parse_settings(config.settings)
        except Invalid as e:
            raise Err(Error_InvalidSettings(str(e)))

    def resolve(self, query: Query) -> Resolution:
        if _services is None:
            raise Err(Error_Internal("called before configure"))
        name = query.endpoint_name.lower() if query.endpoint_name is not None else None
        endpoints = [
            endpoint
            for endpoint_name, endpoint in _services.get(query.service.lower(), [])
            if endpoint_name == name
            # An endpoint without a scheme suits any; the host orders by preference.
            and (not query.schemes or endpoint.scheme is None or endpoint.scheme in query.schemes)
        ]
        log.log(log.Level.DEBUG, f"{query.service}: {len(endpoints)} endpoints")
        # No endpoints: the host asks the next provider.
        return Resolution(endpoints=endpoints, ttl_ms=_ttl_ms, version=None)

    def watch(self, query: Query, version: str, timeout_ms: int) -> Optional[Resolution]:
        raise Err(Error_Unsupported("this provider does not watch; the host polls it"))


def parse_settings(text: str):
    """Errors name the place: `services.basket[1].port: expected an integer 0..65535, got "x"`."""
    try:
        settings = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise Invalid(f"settings: not valid JSON: {e}")
    services: dict[str, list[tuple[Optional[str], Endpoint]]] = {}
    ttl_ms = None
    for key, value in _object(settings, "settings").items():
        if key == "ttl-ms":
            ttl_ms = _integer(value, MAX_SAFE_INTEGER, "a non-negative integer", key)
        elif key == "services":
            for service, items in _object(value, key).items():
                at = f"services.{service}"
                if not isinstance(items, list):
                    raise Invalid(f"{at}: expected a list of endpoints, got {_got(items)}")
                if service.lower() in services:
                    raise Invalid(f"{at}: duplicate service (names are case-insensitive)")
                services[service.lower()] = [_endpoint(item, f"{at}[{i}]") for i, item in enumerate(items)]
        else:
            raise Invalid(f'{key}: unknown key (expected "services" or "ttl-ms")')
    return services, ttl_ms


def _endpoint(value: Any, at: str) -> tuple[Optional[str], Endpoint]:
    fields = _object(value, at)
    if "host" not in fields:
        raise Invalid(f'{at}: missing "host"')
    host = fields["host"]
    if not isinstance(host, str) or not host:
        raise Invalid(f"{at}.host: expected a non-empty string, got {_got(host)}")
    name = None
    endpoint = Endpoint(scheme=None, host=host, port=None, path=None, metadata=[])
    for key, value in fields.items():
        where = f"{at}.{key}"
        if key == "host":
            pass
        elif key == "port":
            endpoint.port = _integer(value, 65535, "an integer 0..65535", where)
        elif key == "scheme":
            endpoint.scheme = _string(value, where).lower()
        elif key == "name":
            name = _string(value, where).lower()
        elif key == "path":
            endpoint.path = _string(value, where)
        elif key == "metadata":
            endpoint.metadata = [(k, _string(v, f"{where}.{k}")) for k, v in _object(value, where).items()]
        else:
            raise Invalid(f"{where}: unknown key")
    return name, endpoint


def _object(value: Any, at: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{at}: expected an object, got {_got(value)}")
    return value


def _string(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{at}: expected a string, got {_got(value)}")
    return value


def _integer(value: Any, maximum: int, expected: str, at: str) -> int:
    """An integer in 0..=maximum; 8443.0 counts as 8443, as it does in JavaScript."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise Invalid(f"{at}: expected {expected}, got {_got(value)}")
    return value


def _got(value: Any) -> str:
    """How an error message shows a value: scalars as JSON, containers by kind."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return json.dumps(value, ensure_ascii=False)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")
