"""The plumbing ``pavlit label`` and ``pavlit search`` share.

``args`` (``SamplerArgs``, ``LaunchArgs``), ``chunks`` (``JobSpec``: problems, chunking and the settings fingerprint;
``run_chunks``: the loop over a rank's chunks), ``seeds`` (``phase_seed``), ``shards`` (``ShardStore``: one atomically
committed, integrity-checked shard per chunk), ``atomic`` (atomic file writes), ``lock`` (one job per output
folder), ``settings`` (``fingerprint``, ``describe``) and ``jsonl`` (the one JSON Lines reader).
"""
