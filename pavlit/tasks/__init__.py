"""Problem sources with a binary checker (``pavlit.tasks`` plugins): ``arithmetic`` (the embedded default),
``planted`` (the paper's didactic task), ``reasoning_gym`` and ``jsonl``; shared answer checking in
:mod:`pavlit.tasks.answers`."""
