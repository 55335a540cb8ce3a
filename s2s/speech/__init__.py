"""Speech parts whose weights ship in their wheels: espeak-ng, pocketsphinx, silero-vad."""
