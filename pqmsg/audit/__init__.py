"""The audit log: security-relevant events as scrubbed, append-only JSON lines.

- :mod:`pqmsg.audit.events`: the event names and outcomes;
- :mod:`pqmsg.audit.pseudonym`: how identifiers become pseudonyms (nothing
  raw reaches the file);
- :mod:`pqmsg.audit.segments`: the segment files, rotation, sealing, and
  the off-host export behind ``pqmsg audit export``.

The service that writes the log is :mod:`pqmsg.nurseries.audit`.
"""
