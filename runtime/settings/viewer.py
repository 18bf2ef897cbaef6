"""anomaly-viewer's settings: the shared connection and streams, the artifact it draws with, labelling."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from runtime.settings.base import StreamSettings


class ViewerSettings(StreamSettings):
    """What anomaly-viewer reads from ANOMALY_* variables (--host and --port are flags)."""

    artifact: Path | None = Field(
        None, description="the served artifact directory: the viewer redraws reconstructions with it"
    )
    viewer_token: SecretStr | None = Field(
        None, description="anomaly-viewer: the token that allows labelling (unset: the page is read-only)"
    )
