"""Ray job entry points and the ``spellshield`` CLI: build-index, memorizer, generate, audit, demo."""
