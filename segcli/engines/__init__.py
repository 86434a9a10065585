"""Schedulers of the per-image steps (:mod:`segcli.method.steps`): the local engine (this process, or a pool of
worker processes on this machine) and, beside it, the cluster engine. They differ in where a step runs,
never in what it computes."""
