"""The producers' import path since the first release: `from worker.client import ImageProducer`.

The producer side lives in `producer.client`; this name stays for the programs that import it.
"""

from producer.client import ImageProducer

__all__ = ["ImageProducer"]
