"""The OpenAI-compatible upstream: ``client`` makes the calls (I/O), ``outcome`` classifies what
they came to and paces retries, ``sse`` parses and assembles streamed answers."""
