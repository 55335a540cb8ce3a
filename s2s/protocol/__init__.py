"""Data-channel events, shaped as the OpenAI Realtime API (GA) defines them, plus s2s extensions.

Every event is a msgspec ``Struct`` tagged by its ``type``; a client message decodes in one call
(``codec.decode_client_event``) and every server event encodes with ``codec.encode_event``. Pure:
no I/O. Fields that stock clients send but s2s does not use (``tracing``, ``include``, audio
``format`` objects...) are accepted and ignored, since msgspec skips unknown fields. Function
``tools`` are taken (``s2s.tools`` checks them); other tool types (``mcp``) are refused by name.
Our own events are namespaced ``s2s.*``. ``python -m s2s.protocol`` prints the JSON schema.

- ``session_config``: the session's configuration (turn detection, voice, tools) and its patch.
- ``items``: conversation items and their content parts.
- ``client_events`` / ``server_events``: the events each side sends.
- ``codec``: JSON decoding (with errors that name the bad path) and encoding.
- ``schema``: the JSON schema of all events (``docs/events.schema.json``).
- ``ids``: ids of events, items, responses and calls.
"""
