"""Looking back at what a run produced: `status` (state.json), `trace` (one record through
every stage) and `diff` (two outputs joined on a key). They read the workdir; none of them
runs a stage or sends a request."""
