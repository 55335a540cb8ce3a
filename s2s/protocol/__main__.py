"""``python -m s2s.protocol`` prints the JSON schema of every event."""

import json

from s2s.protocol.schema import json_schema

print(json.dumps(json_schema(), indent=2, sort_keys=True))
