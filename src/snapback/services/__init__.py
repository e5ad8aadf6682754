"""Use-cases: volumes, snapshots, images, gc. Services hold the transactions."""
