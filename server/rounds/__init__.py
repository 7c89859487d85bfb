"""Round protocols: one file per ``secure_aggregation`` mode, registered in :data:`PROTOCOLS`."""

from server.rounds.base import RoundProtocol
from server.rounds.homomorphic import HomomorphicRounds
from server.rounds.plaintext import PlaintextRounds
from server.rounds.secagg import SecAggRounds

#: One round protocol per ``secure_aggregation`` mode; the next mode is one more file here.
PROTOCOLS: dict[str, type[RoundProtocol]] = {p.mode: p for p in (PlaintextRounds, HomomorphicRounds, SecAggRounds)}
