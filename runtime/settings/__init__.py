"""Every ANOMALY_* setting of the fleet, one class per program, on shared bases (`base`).

One environment (a ConfigMap, a compose file, a shell) may serve several programs: each reads its
own fields, and a variable that no program knows is refused as a typo (`environment`).
"""

from __future__ import annotations

from runtime.settings.base import AnomalySettings, RedisSettings, StreamSettings
from runtime.settings.environment import setting_names, unknown_variables
from runtime.settings.notify import NotifySettings
from runtime.settings.viewer import ViewerSettings
from runtime.settings.worker import WorkerSettings

ALL_SETTINGS: tuple[type[AnomalySettings], ...] = (WorkerSettings, ViewerSettings, NotifySettings)
KNOWN_VARIABLES = setting_names(ALL_SETTINGS)

__all__ = [
    "ALL_SETTINGS",
    "KNOWN_VARIABLES",
    "AnomalySettings",
    "NotifySettings",
    "RedisSettings",
    "StreamSettings",
    "ViewerSettings",
    "WorkerSettings",
    "unknown_variables",
]
