"""The conformance suite: every backend checked against the CPU reference.

Run it on any installed backend, from any folder, with nothing but the installed packages::

    crossinfer conformance --device NAME [--emulate] [--level L3] [--report out.json]
    pytest --pyargs crossinfer_conformance --backend NAME [--emulate] [--level L3]
           [--report out.json] [--conformance-seed 0] [-k gqa4]
    crossinfer conformance --matrix FOLDER     # backends x checks from every report in FOLDER

Levels (``--level LN`` runs every level up to and including LN; the default is L5, all of
them; pick single cases or levels with ``-k``, e.g. ``-k L2-attention``):

* L0 discovery: the entry point loads, its api_version major matches, probe() is cheap
  (under 2 s, no accelerator context created, measured first thing in a fresh process) and
  honest (available implies a tensor, a KV write and an attention call work).
* L1 capabilities: every advertised dtype, KV-cache dtype, block size and head size runs.
* L2 kernels: write_kv and copy_blocks with sentinels, paged attention (prefill, prefill
  after a cached prefix, decode, mixed ragged batches, long contexts; GQA 1/2/4; several
  block sizes, head sizes and dtypes), each compared with the CPU reference.
* L3 memory: memory_info is plausible, allocate_kv_cache honours the requested size and
  device, freeing returns memory.
* L4 collectives: two local processes, all_reduce / all_gather / broadcast / barrier.
* L5 engine: a tiny random Llama through the whole engine gives the CPU backend's greedy
  tokens, also with prefix-cache hits and with forced preemption.

Every case is data (:mod:`crossinfer_conformance.cases`) with a readable id such as
``L2-attention-mixed-fp32-bs16-h64-gqa4``. Random inputs derive from ``--conformance-seed``
(default 0) and the case id, so a case filtered with ``-k`` sees the same inputs; the seed is
printed in the header and the report. A case outside the backend's Capabilities is recorded
"not-supported" (a pytest skip with the reason), never passed or failed. Cases run one by one
in a worker process; a case that kills it (a crashing kernel) or outlives
``--conformance-timeout`` is recorded "crashed" (a failure) and a fresh worker runs the rest.

``--emulate`` sets the environment variable ``CROSSINFER_EMULATE=1`` before the backend is
loaded, in every process of the run. A backend that can run its own kernels on a stand-in
(Triton's interpreter, Pallas interpret mode, XLA's CPU device) reads it, lets its probe
succeed without the hardware, and sets ``Capabilities.emulated``; the report's ``emulated``
field is that flag (``emulate_requested`` records the option). Backends without an emulator
ignore it.

``--report PATH`` writes a JSON report (backend, package and version, api version, device,
emulated or real, seed, each case's outcome and message) and a Markdown matrix beside it
(``PATH`` with the suffix ``.md``).
"""

from __future__ import annotations

LEVELS: tuple[str, ...] = ("L0", "L1", "L2", "L3", "L4", "L5")
"""The levels in order; ``--level LN`` runs L0 through LN."""

EMULATE_ENV = "CROSSINFER_EMULATE"
"""Set to "1" by ``--emulate`` before any backend is constructed."""
