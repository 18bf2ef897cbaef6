"""Which ANOMALY_* variables a process may find in its environment: the settings of every program of
the fleet (one environment may serve them all), the trainer's data lookup, and what platforms add.

Kubernetes injects service links for every Service of the namespace (`enableServiceLinks`, on by
default): a Service `anomaly-worker` gives each pod ANOMALY_WORKER_SERVICE_HOST=10.0.0.7,
ANOMALY_WORKER_SERVICE_PORT=9400, ANOMALY_WORKER_PORT=tcp://10.0.0.7:9400,
ANOMALY_WORKER_PORT_9400_TCP(_PROTO, _PORT, _ADDR) and one ANOMALY_WORKER_SERVICE_PORT_<NAME> per
named port. Those are recognised by name and value (a service's _SERVICE_HOST must be there and be
an address), so a misspelt setting such as ANOMALY_METRIC_PORT=9400 is still refused.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping

from pydantic_settings import BaseSettings

from runtime.settings.base import ENV_PREFIX

# ANOMALY_* variables that belong to no settings class (the trainer's dataset lookup).
OTHER_VARIABLES = frozenset({"ANOMALY_DATA_DIR"})

_PROTOCOLS = "(?:TCP|UDP|SCTP)"
_SERVICE_VALUE_SHAPES: tuple[tuple[str, str], ...] = (
    # suffix after the service prefix, value pattern ("ip" is an IP address)
    (r"_SERVICE_HOST", "ip"),
    (r"_SERVICE_PORT", r"\d{1,5}"),
    (r"_SERVICE_PORT_[A-Z0-9_]+", r"\d{1,5}"),
    (r"_PORT", r"(?:tcp|udp|sctp)://\S+:\d{1,5}"),
    (rf"_PORT_\d{{1,5}}_{_PROTOCOLS}", r"(?:tcp|udp|sctp)://\S+:\d{1,5}"),
    (rf"_PORT_\d{{1,5}}_{_PROTOCOLS}_PROTO", r"(?:tcp|udp|sctp)"),
    (rf"_PORT_\d{{1,5}}_{_PROTOCOLS}_PORT", r"\d{1,5}"),
    (rf"_PORT_\d{{1,5}}_{_PROTOCOLS}_ADDR", "ip"),
)


def setting_names(classes: Iterable[type[BaseSettings]]) -> frozenset[str]:
    """The ANOMALY_<FIELD> name of every field of these settings classes."""
    return frozenset(f"{ENV_PREFIX}{name.upper()}" for cls in classes for name in cls.model_fields)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def service_link_variables(environ: Mapping[str, str]) -> frozenset[str]:
    """The ANOMALY_* variables that are Kubernetes service links (by name and value), see above."""
    services = {
        name[: -len("_SERVICE_HOST")]
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and name.endswith("_SERVICE_HOST") and _is_address(value)
    }
    links = set()
    for name, value in environ.items():
        for service in services:
            if not name.startswith(service + "_"):
                continue
            suffix = name[len(service) :]
            for shape, pattern in _SERVICE_VALUE_SHAPES:
                if re.fullmatch(shape, suffix) and (
                    _is_address(value) if pattern == "ip" else re.fullmatch(pattern, value)
                ):
                    links.add(name)
    return frozenset(links)


def unknown_variables(environ: Mapping[str, str], known: frozenset[str]) -> list[str]:
    """A message for each ANOMALY_* variable that is neither in `known`, nor another program's, nor a
    platform's: a typo would otherwise be silently ignored."""
    links = service_link_variables(environ)
    messages = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_VARIABLES or name in links:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        messages.append(f"unknown setting {name}{hint}")
    return messages
