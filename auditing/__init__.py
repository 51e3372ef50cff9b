"""Reading a finished run back and judging it, without Ray: statistics (Wilson intervals), the
run's completeness against its plan, the collapse warning, the gate's verdict, the report.

``spellshield.jobs.audit`` fans the per-tar image checks out on Ray (``workers.audit``) and
hands the rows to these modules."""
