"""Consumer-group housekeeping shared by the programs that read through a group (the workers on
the input streams, anomaly-notify on the output streams).

Every pod that starts adds a consumer to its group under its own name (the hostname), and the
names of pods that died or were scaled away stay in the group's XINFO CONSUMERS for good.
`ConsumerPruner` removes those that hold nothing and have not read for a while, in one script, so a
consumer that reads entries between the check and the delete cannot lose them (XGROUP DELCONSUMER
drops what a consumer holds).
"""

from __future__ import annotations

from typing import Any

import redis

PRUNE_INTERVAL_SECONDS = 60.0  # how often a program looks for idle consumers

# KEYS[1] the stream; ARGV: the group, the idle time in ms, the name never removed (the caller's).
PRUNE_SCRIPT = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""


class ConsumerPruner:
    """Removes a group's consumers that hold no pending entry and have been idle too long."""

    def __init__(self, client: Any) -> None:
        self._script = client.register_script(PRUNE_SCRIPT)

    def prune(self, stream: str, group: str, min_idle_ms: int, keep: str) -> list[str]:
        """Delete the consumers of `group` on `stream` idle longer than `min_idle_ms` with nothing
        pending, never `keep` (the caller); returns their names."""
        removed = self._script(keys=[stream], args=[group, min_idle_ms, keep])
        return [name.decode() if isinstance(name, bytes) else str(name) for name in removed]


def refused_by_acl(exc: redis.ResponseError) -> bool:
    """The Redis user may not run the script (NOPERM) or a command inside it (a script error)."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or "can't run this command" in str(exc)
