"""Stage one's machinery: the work plan (:mod:`.plan`), host batches (:mod:`.batches`), the HF scorer on the
process's device (:mod:`.hf`) and the thread that turns scored chunks into committed shards (:mod:`.commit`).
The recipe that drives them is :mod:`dpocache.stages.score`."""
