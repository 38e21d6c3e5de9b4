"""Distribution of model versions to a fleet of inference hosts, peer to peer.

:mod:`minutely.fleet.tracker` is a region's tracker (who holds which chunk of which version,
and who may fetch a chunk from the origin); :mod:`minutely.fleet.agent` runs on every server
host: it fetches new versions chunk by chunk from peers and the origin, verifies them, serves
its chunks to peers, and installs each complete version into a local registry folder that the
inference workers load from. Both are HTTP services (``python -m minutely.fleet.tracker``,
``python -m minutely.fleet.agent``) and classes usable in-process.
"""
