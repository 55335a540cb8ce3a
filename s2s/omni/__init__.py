"""Qwen3-Omni run as a stream: text and 80 ms speech frames for many calls at once.

- ``prompt``: the model's inputs from chat messages (audio, pictures, text) without Qwen's
  processor class (it needs torchvision), within a token budget;
- ``media``: a call's clips and pictures prepared, tokenized and encoded once across its turns;
- ``request``: what a call asks for (``Request``, ``Decoding``), a step's output per call, and
  the cache positions a slot needs (``cache_positions``);
- ``model``: a checkpoint loaded for the engine (``load_model``, ``prepare_model``);
- ``engine``: ``OmniEngine``, calls' slots and their lifecycle, with ``begin`` / ``prefill`` (or
  ``add``) / ``step`` / ``cancel``;
- ``prefill``: a prompt's encoders, positions and pieces, for a prefill in pieces between steps;
- ``kept``: a finished reply's caches left in its slot, and how much of the next turn's prompt
  they already hold;
- ``rows``: a step's host side: each answering call's state, the columns a step uploads, its
  shape (``StepLayout``);
- ``decode``: a step's device work (``DecodeStep``): the thinker's part, then the code
  predictor's, code2wav's and the talker's;
- ``graphs``: each part of a step captured as a CUDA graph per shape, replayed;
- ``slots``: per-call key/value caches in one tensor and the decode step over them (``layers``:
  the attention and norms they use);
- ``moe``: the mixture-of-experts feed-forward with tokens grouped by expert;
- ``predictor``: the code predictor's residual codebooks with a cache of its own;
- ``code2wav``: the vocoder frame by frame, equal to decoding the whole reply;
- ``sampling``: ``generate()``'s token filters for a batch with per-call settings, drawn with
  each call's own noise (``s2s.noise``).

What does not stream, and why:

- The audio encoder attends both ways inside windows of ``n_window_infer`` mel frames (8 s), so
  a window's features change until its audio is complete: a turn's audio is encoded when the
  turn is committed (complete 8 s windows could be encoded earlier; not done).
- The thinker's prefill needs the whole turn (its audio tokens and their 3-D RoPE positions),
  and the talker's prefill needs the thinker's first token and the hidden states of the user
  turns, so first audio comes one thinker prefill, one talker prefill and one step after the
  commit. Earlier turns are not prefilled again while the conversation's slot is kept
  (``kept``); a prompt that changed near its start is.
- Everything after that streams: the talker takes text token ``j`` with frame ``j`` (as
  ``generate()`` feeds ``trailing_text_hidden``), which the thinker made in the same step, and
  code2wav is causal throughout.
- ``generate()`` decodes replies over 300 frames (24 s) in chunks with 25 frames of left context,
  an approximation; streaming equals decoding the whole reply at once instead.
- Qwen2.5-Omni is not on this loop. Its thinker and talker would step as these do (its talker
  takes reply token ``j`` with code ``j``), but its token2wav integrates a DiT over the whole code
  sequence: 36 chained evaluations (10 RK4 points), each reaching one 240 ms block ahead and two
  back, so a code changes the mel up to 8.6 s before it (``scripts/probe_token2wav.py``); only an
  approximate chunked form could stream.
"""
