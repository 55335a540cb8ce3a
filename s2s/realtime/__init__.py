"""The Realtime conversation of one call: items, turns, responses, barge-in and steering.

- ``call``: ``Realtime``, which the session drives with client events, VAD edges, model steps
  and playback progress; it answers with the server events of the OpenAI Realtime API.
- ``responses``: the response in progress, from ``response.created`` to ``response.done``, with
  its transcript sent as playback reaches it.
- ``active_response``: one response in progress and the events that spell it out on the wire.
- ``conversation``: the call's items in order and the pictures the caller sent or showed.
"""
