"""Development helpers shared by the tests, the benchmarks and the demos (like `torch.testing`): nothing in the
trainer or the shard tools imports them.

- `servers`: a local S3 server (moto), a TCP proxy that cuts, delays, paces and refuses connections like a real
  object store misbehaving, an HTTP server with ranged reads, the free-port helpers;
- `emulators`: the GCS (gcp-storage-emulator) and Azure Blob (Azurite) emulators, started like the S3 server;
- `listing`: a fake S3 bucket listing of any size (millions of shards) for the pre-training shard check;
- `near_dups`: photo-like images with planted near-duplicates, for the dedup checks.
"""
