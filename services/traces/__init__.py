"""Traces on one machine: a local OTLP receiver, the span store it writes, and
``scoremesh traces``, which reads that store.

    model      spans and traces as typed records, and the attribute names the CLI reads
    otlp       OTLP (protobuf and JSON) → span records: the one conversion at this boundary
    store      the SQLite store under ``$SCOREMESH_HOME/traces`` (WAL: one writer, any readers)
    writer     commits exports in batches from one thread, prunes to the configured bounds
    receiver   OTLP/gRPC and OTLP/HTTP on 127.0.0.1, and what ``scoremesh up`` starts
    render     the trace table and the waterfall, as text and as JSON
    command    ``scoremesh traces``
    settings   ``SCOREMESH_TRACES_*``
"""
